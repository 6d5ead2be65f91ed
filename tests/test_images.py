import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from unconfuse.eval.images import check_images, dicom_to_rgb, is_dicom, load_image
from unconfuse.eval.pairs import Benchmark, Pair


def test_monochrome1_is_inverted_so_bone_is_bright():
    path = get_testdata_file("RG3_UNCR.dcm")  # a leg radiograph stored as MONOCHROME1
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    rgb = np.asarray(dicom_to_rgb(path))[..., 0].astype(float)
    raw = ds.pixel_array.astype(float)
    # stored values are high where the film is dark: our output must be anti-correlated with them
    assert np.corrcoef(rgb.ravel(), raw.ravel())[0, 1] < -0.9
    assert rgb.min() == 0 and rgb.max() == 255


def test_window_from_the_file_is_applied():
    path = get_testdata_file("693_UNCR.dcm")  # a head CT with a 40/100 brain window
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    gray = np.asarray(dicom_to_rgb(path))[..., 0]
    # below the window is black, above is white
    assert gray[hu <= center - width / 2].max() == 0
    assert gray[hu >= center + width / 2].min() == 255


def test_multiframe_takes_the_middle_frame_and_colour_files_stay_colour():
    path = get_testdata_file("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array
    middle = frames[len(frames) // 2].astype(float)
    gray = np.asarray(dicom_to_rgb(path))[..., 0].astype(float)
    assert np.corrcoef(gray.ravel(), middle.ravel())[0, 1] > 0.99
    us = np.asarray(dicom_to_rgb(get_testdata_file("US1_UNCR.dcm")))
    assert us.shape[-1] == 3 and np.abs(us[..., 0].astype(int) - us[..., 2]).max() > 50  # real colour (Doppler)


def test_dicom_without_suffix_is_detected(tmp_path):
    target = tmp_path / "IM0001"
    target.write_bytes(open(get_testdata_file("MR_small.dcm"), "rb").read())
    assert is_dicom(target)
    assert load_image(target).size == (64, 64)


def test_check_images_lists_every_problem(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    pairs = [Pair("p1", "ok.png", "missing.png", "Q", "a", "b", "A", "B"),
             Pair("p2", "broken.png", "ok.png", "Q", "a", "b", "B", "A"),
             Pair("p3", "missing.png", "ok.png", "Q", "a", "b", "A", "B")]
    problems = check_images(Benchmark(pairs, tmp_path, "t"))
    listed = sorted((p.pair_id, p.side, p.reason.split(" ")[0]) for p in problems)
    assert listed == [("p1", 2, "missing"), ("p2", 1, "unreadable"), ("p3", 1, "missing")]
    assert str(tmp_path / "missing.png") in str(problems[0])


def test_sample_benchmark_is_real_and_balanced(sample_bench):
    from unconfuse.eval.benchmarks import load_benchmark

    bench = load_benchmark(sample_bench)
    assert len(bench.pairs) == 6 and not check_images(bench)
    answers = [(p.answer_1, p.answer_2) for p in bench.pairs]
    assert answers.count(("A", "B")) == answers.count(("B", "A")) == 3
    kinds = {bench.resolve_image(r).suffix for r in bench.unique_images()}
    assert kinds == {".dcm", ".png"}
