"""`unconfuse data download` against a loopback stand-in for GitHub raw files and the PMC S3 bucket."""
import hashlib
import io
import json
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
from PIL import Image

from unconfuse.cli.commands import main
from unconfuse.eval.download import DownloadConfig, download

from .http_stub import CUT, StubServer


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


class FakeBucket:
    """Articles as S3 keys PMC<id>.<version>/<file>, ListObjectsV2 with 2 keys per page, flaky and broken objects."""

    def __init__(self):
        self.objects = {
            "PMC100.1/fig1.jpg": jpeg(1), "PMC100.2/fig1.jpg": jpeg(2), "PMC100.2/fig2.jpg": jpeg(3),
            "PMC100.2/article.xml": b"<xml/>",
            "PMC200.1/f.jpg": jpeg(4), "PMC200.2/other.jpg": jpeg(5),
            "PMC300.1/flaky.jpg": jpeg(6),
            "PMC400.1/bad.jpg": jpeg(7),
            "PMC600.1/torn.jpg": jpeg(8), "PMC700.1/garbled.jpg": jpeg(9),
        }
        self.broken_once = {"PMC600.1/torn.jpg": "cut", "PMC700.1/garbled.jpg": "md5"}  # each fine the second time
        bad = bytearray(jpeg(7))
        bad[len(bad) // 2] ^= 0xFF
        self.served = {"PMC400.1/bad.jpg": bytes(bad)}  # same size as listed, wrong MD5
        self.flaky_left = {"PMC300.1/flaky.jpg": 2}  # 503 twice, then fine
        self.image_dict = {
            "train/radiology/images/ROCO_1.jpg": {"local": 1, "dlink": "ftp://x/oa_package/aa/bb/PMC100.tar.gz", "file_name": "fig1.jpg"},
            "train/radiology/images/ROCO_2.jpg": {"local": 2, "dlink": "ftp://x/oa_package/aa/bb/PMC100.tar.gz", "file_name": "fig2.jpg"},
            "train/radiology/images/ROCO_3.jpg": {"local": 3, "dlink": "ftp://x/oa_package/cc/dd/PMC200.tar.gz", "file_name": "f.jpg"},
            "train/radiology/images/ROCO_4.jpg": {"local": 4, "dlink": "ftp://x/oa_package/ee/ff/PMC300.tar.gz", "file_name": "flaky.jpg"},
            "test/radiology/images/ROCO_5.jpg": {"local": 5, "dlink": "ftp://x/oa_package/gg/hh/PMC400.tar.gz", "file_name": "bad.jpg"},
            "test/radiology/images/ROCO_6.jpg": {"local": 6, "dlink": "ftp://x/oa_package/ii/jj/PMC500.tar.gz", "file_name": "gone.jpg"},
            "test/radiology/images/ROCO_7.jpg": {"local": 7, "dlink": "ftp://x/oa_package/kk/ll/PMC600.tar.gz", "file_name": "torn.jpg"},
            "test/radiology/images/ROCO_8.jpg": {"local": 8, "dlink": "ftp://x/oa_package/mm/nn/PMC700.tar.gz", "file_name": "garbled.jpg"},
        }
        self.dataset = {"1": {"im_1_local": 1, "im_2_local": 3, "question": "Q?", "option_A": "a", "option_B": "b",
                              "im_1_correct": "A", "im_2_correct": "B", "category_1": ["Cardiac"], "category_2": ["Cardiac"]}}

    def listing(self, prefix: str, token: str | None) -> bytes:
        keys = sorted(k for k in self.objects if k.startswith(prefix))
        start = int(token or 0)
        page, more = keys[start:start + 2], start + 2 < len(keys)
        items = "".join(f"<Contents><Key>{k}</Key><Size>{len(self.objects[k])}</Size>"
                        f"<ETag>&quot;{hashlib.md5(self.objects[k]).hexdigest()}&quot;</ETag></Contents>" for k in page)
        nxt = f"<NextContinuationToken>{start + 2}</NextContinuationToken>" if more else ""
        return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>pmc-oa-opendata</Name><Prefix>{prefix}</Prefix><IsTruncated>{'true' if more else 'false'}</IsTruncated>"
                f"{items}{nxt}</ListBucketResult>").encode()

    def __call__(self, method, path, body, headers):
        url = urlparse(path)
        if url.path == "/repo/dataset.json":
            return 200, json.dumps(self.dataset).encode(), {}
        if url.path == "/repo/image_dict.json":
            return 200, json.dumps(self.image_dict).encode(), {}
        if url.path == "/bucket/" and "list-type=2" in url.query:
            query = parse_qs(url.query)
            return 200, self.listing(query["prefix"][0], query.get("continuation-token", [None])[0]), {}
        key = unquote(url.path[len("/bucket/"):])
        if self.flaky_left.get(key):
            self.flaky_left[key] -= 1
            return 503, b"slow down", {}
        broken = self.broken_once.pop(key, None)
        if broken == "cut":  # the connection drops half-way through the body
            return 200, self.objects[key], {CUT: len(self.objects[key]) // 2}
        if broken == "md5":
            garbled = bytearray(self.objects[key])
            garbled[len(garbled) // 2] ^= 0xFF
            return 200, bytes(garbled), {}
        if key in self.objects:
            return 200, self.served.get(key, self.objects[key]), {}
        return 404, b"NoSuchKey", {}


def _config(server, out, **kw):
    return DownloadConfig(out=out, questions_url=f"{server.url}/repo/dataset.json",
                          image_dict_url=f"{server.url}/repo/image_dict.json", pmc_base=f"{server.url}/bucket",
                          jobs=3, backoff=0.01, progress=False, **kw)


def test_download_verifies_retries_reports_and_resumes(tmp_path):
    bucket = FakeBucket()
    out = tmp_path / "mc"
    with StubServer(bucket) as server:
        failures = download(_config(server, out))
        assert sorted(f.local for f in failures) == ["5", "6"]
        reasons = {f.local: f.reason for f in failures}
        assert "MD5" in reasons["5"] and "no version of PMC500" in reasons["6"]
        assert f"{server.url}/bucket/PMC400.1/bad.jpg" in str(failures[0])
        assert f"{server.url}/bucket/?list-type=2&prefix=PMC500." in str(failures[1])
        images = out / "images"
        assert (images / "1.jpg").read_bytes() == bucket.objects["PMC100.2/fig1.jpg"]  # newest version wins
        assert (images / "3.jpg").read_bytes() == bucket.objects["PMC200.1/f.jpg"]  # newest that has the file
        assert (images / "4.jpg").read_bytes() == bucket.objects["PMC300.1/flaky.jpg"]  # retried through 503s
        assert not (images / "5.jpg").exists() and not list(images.glob(".*tmp"))
        # a body cut mid-transfer and one garbled in transit (MD5) are fetched again within the run
        assert (images / "7.jpg").read_bytes() == bucket.objects["PMC600.1/torn.jpg"]
        assert (images / "8.jpg").read_bytes() == bucket.objects["PMC700.1/garbled.jpg"]
        manifest = json.loads((out / "manifest.json").read_text())
        assert set(manifest) == {"1", "2", "3", "4", "7", "8"}
        assert manifest["2"]["sha256"] == hashlib.sha256(bucket.objects["PMC100.2/fig2.jpg"]).hexdigest()
        assert manifest["2"]["url"].endswith("/bucket/PMC100.2/fig2.jpg")
        listings = [p for m, p, h in server.requests if "list-type" in p and "PMC100" in p]
        assert len(listings) == 2  # one article listed once, over two pages

        # the bad object is fixed upstream; a rerun fetches only what is missing or no longer verified
        bucket.served.clear()
        (images / "3.jpg").write_bytes(b"tampered")
        server.requests.clear()
        failures = download(_config(server, out))
        assert [f.local for f in failures] == ["6"]
        fetched = sorted(p for m, p, h in server.requests if "list-type" not in p)
        assert fetched == ["/bucket/PMC200.1/f.jpg", "/bucket/PMC400.1/bad.jpg"]
        assert (images / "3.jpg").read_bytes() == bucket.objects["PMC200.1/f.jpg"]


def test_download_command_exits_non_zero_and_keeps_what_succeeded(tmp_path, capsys):
    with StubServer(FakeBucket()) as server:
        code = main(["data", "download", "--out", str(tmp_path / "mc"), "--questions-url", f"{server.url}/repo/dataset.json",
                     "--image-dict-url", f"{server.url}/repo/image_dict.json", "--pmc-base", f"{server.url}/bucket",
                     "--jobs", "2", "--quiet", "--retries", "1"])
    err = capsys.readouterr().err
    # one retry is not enough for the object that answers 503 twice
    assert code == 1 and "3 image(s) failed" in err
    assert "4.jpg <- http://127.0.0.1" in err and "/bucket/PMC300.1/flaky.jpg: HTTP 503 after 2 attempts" in err
    assert "gone.jpg is in no version of PMC500" in err
    assert sorted(p.name for p in (tmp_path / "mc" / "images").glob("*.jpg")) == ["1.jpg", "2.jpg", "3.jpg", "7.jpg", "8.jpg"]  # broken once: one retry is enough
    from unconfuse.eval.benchmarks import load_benchmark
    from unconfuse.eval.images import check_images

    bench = load_benchmark(tmp_path / "mc")
    assert bench.pairs[0].image_1 == "1.jpg" and not check_images(bench)


def test_download_from_a_local_roco_copy(tmp_path):
    bucket = FakeBucket()
    roco = tmp_path / "roco" / "data"
    for i, key in enumerate(bucket.image_dict, start=1):
        if i != 6:
            (roco / key).parent.mkdir(parents=True, exist_ok=True)
            (roco / key).write_bytes(jpeg(100 + i))
    with StubServer(bucket) as server:
        failures = download(_config(server, tmp_path / "mc", roco=tmp_path / "roco"))
        assert not any("bucket" in p for m, p, h in server.requests)
    assert [f.local for f in failures] == ["6"] and "not in the ROCO folder" in failures[0].reason
    assert (tmp_path / "mc" / "images" / "2.jpg").read_bytes() == jpeg(102)


def test_download_names_the_questions_url_that_failed(tmp_path, capsys):
    with StubServer(FakeBucket()) as server:
        code = main(["data", "download", "--out", str(tmp_path / "mc"), "--questions-url", f"{server.url}/repo/missing.json",
                     "--image-dict-url", f"{server.url}/repo/image_dict.json", "--pmc-base", f"{server.url}/bucket",
                     "--quiet", "--retries", "0"])
        assert [p for m, p, h in server.requests] == ["/repo/missing.json"]  # a 404 is not retried
    assert code == 1 and f"{server.url}/repo/missing.json: HTTP 404" in capsys.readouterr().err
