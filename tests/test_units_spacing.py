"""Header units, the plausible spacing range and the size limits: a file in metres reads as millimetres,
an implausible spacing or a header declaring an enormous image is refused naming the file, and a case
that would resample to more voxels than the limit is refused before anything is allocated."""

import gzip
import struct
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from pancreas_mtl.commands.cli import main as cli_main
from pancreas_mtl.raw.checks import load_case
from pancreas_mtl.raw.errors import DataError, DatasetError
from pancreas_mtl.raw.io import read_volume, write_nifti
from pancreas_mtl.raw.layout import Case, discover
from pancreas_mtl.raw.limits import InputLimits
from pancreas_mtl.dataset.cache import build_cache, dataset_cache_root
from pancreas_mtl.dataset.prepare import prepare_dataset
from pancreas_mtl.dataset.preprocessing import preprocess
from pancreas_mtl.inference.input_grid import write_mask
from tests.conftest import REPO_ROOT, lps_affine, make_case_arrays
from tests.test_prepare import data_cfg, small_planning
from tests.test_resampling import small_plan

# header units per millimetre
UNITS_PER_MM = {"meter": 1e-3, "micron": 1e3}


def write_in_unit(array_zyx: np.ndarray, affine_mm: np.ndarray, path, unit: str):
    """A (Z, Y, X) array as NIfTI whose affine is in ``unit`` (header xyzt_units), as some exporters write."""
    affine = np.asarray(affine_mm, dtype=np.float64).copy()
    affine[:3, :] *= UNITS_PER_MM[unit]
    image = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine)
    image.header.set_xyzt_units(unit, "sec")
    image.set_data_dtype(array_zyx.dtype)
    nib.save(image, str(path))
    return path


def _case(folder, name, image, mask, affine, unit=None) -> Case:
    folder.mkdir(parents=True, exist_ok=True)
    if unit is None:
        image_path = write_nifti(image, affine, folder / f"{name}_0000.nii.gz")
        mask_path = write_nifti(mask, affine, folder / f"{name}.nii.gz")
    else:
        image_path = write_in_unit(image, affine, folder / f"{name}_0000.nii.gz", unit)
        mask_path = write_in_unit(mask, affine, folder / f"{name}.nii.gz", unit)
    return Case(name, (image_path,), mask_path, 0, "train")


def test_the_input_limits_are_the_yaml_values():
    limits = OmegaConf.load(REPO_ROOT / "conf" / "limits" / "default.yaml")
    assert InputLimits.defaults() == InputLimits(**OmegaConf.to_container(limits))
    assert InputLimits.from_config({"max_spacing_mm": 5}) == InputLimits(
        **{**OmegaConf.to_container(limits), "max_spacing_mm": 5.0})  # the keys left out: the file's
    with pytest.raises(TypeError, match="conf/limits/default.yaml"):
        InputLimits(min_spacing_mm=0.1)
    with pytest.raises(ValueError, match="unknown key"):
        InputLimits.from_config({"max_spacing": 5})


@pytest.mark.parametrize("unit", ["meter", "micron"])
def test_header_unit_gives_the_mm_spacing_and_the_same_preprocessing(tmp_path, unit):
    image, mask = make_case_arrays(np.random.default_rng(0))
    affine = lps_affine((2.0, 0.8, 0.8))
    in_mm = _case(tmp_path / "mm", "c", image, mask, affine)
    in_unit = _case(tmp_path / unit, "c", image, mask, affine, unit=unit)

    volume = read_volume(in_unit.image_paths[0])
    assert volume.spacing == pytest.approx((2.0, 0.8, 0.8), rel=1e-5)
    np.testing.assert_allclose(volume.affine, affine, rtol=1e-5, atol=1e-4)

    plan = small_plan(target_spacing=(3.0, 1.1, 1.1))  # a real resampling, not the identity
    expected = preprocess(load_case(in_mm), plan)
    found = preprocess(load_case(in_unit), plan)
    assert found.original_spacing == pytest.approx(expected.original_spacing, rel=1e-5)
    assert found.image.shape == expected.image.shape
    np.testing.assert_allclose(found.image, expected.image, atol=1e-5)
    np.testing.assert_array_equal(found.seg, expected.seg)
    assert set(np.unique(found.seg)) == {0, 1, 2}


def test_mask_written_with_the_source_header_keeps_its_affine_and_unit(tmp_path):
    """Prediction writes masks with the image's header and the mm affine read from it: stored back in
    the header's unit, the mask lands on the image's grid."""
    image, mask = make_case_arrays(np.random.default_rng(0))
    source = write_in_unit(image, lps_affine(), tmp_path / "c_0000.nii.gz", "meter")
    header = nib.load(str(source)).header
    direct = nib.load(str(write_nifti(mask, lps_affine(), tmp_path / "direct.nii.gz", header=header)))
    in_metres = np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ lps_affine()
    np.testing.assert_allclose(direct.affine, in_metres, rtol=1e-6, atol=1e-9)

    volume = read_volume(source)
    written = write_mask(mask, volume.affine, tmp_path / "out" / "c.nii.gz", reference_image=source)
    on_disk = nib.load(str(written))
    assert on_disk.header.get_xyzt_units()[0] == "meter"
    np.testing.assert_allclose(on_disk.affine, nib.load(str(source)).affine, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(read_volume(written).affine, lps_affine(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spacing, shown", [
    ((1000.0, 1000.0, 1000.0), "1000"),           # a 20-voxel image at 1000 mm: a 2 TB resampling before
    ((0.002, 0.0008, 0.0008), "0.0008"),          # metres in a header that says mm (or none)
    ((2.0, 0.8, 25.0), "25"),                     # one axis out of range is enough
], ids=["1000mm", "metres_as_mm", "one_axis_25mm"])
def test_implausible_spacing_names_the_file_and_the_spacing(tmp_path, spacing, shown):
    image = np.random.default_rng(0).normal(0, 100, (20, 20, 20)).astype(np.int16)
    mask = np.zeros_like(image, dtype=np.uint8)
    mask[5:10, 5:10, 5:10] = 1
    case = _case(tmp_path, "odd", image, mask, lps_affine(spacing))
    with pytest.raises(DataError) as error:
        load_case(case)
    message = str(error.value)
    assert "case odd" in message and str(case.image_paths[0]) in message
    assert shown in message and "from 0.1 to 20 mm" in message and "max_spacing_mm" in message
    # the range is a setting: widened, the same file loads
    widened = InputLimits.from_config({"min_spacing_mm": 1e-4, "max_spacing_mm": 2000.0})
    assert load_case(case, limits=widened).spacing == pytest.approx(spacing)


def test_check_command_reports_implausible_spacing_and_reads_metres(distributed_dataset, capsys):
    cases = discover(distributed_dataset).labelled
    for case in cases:  # the whole dataset re-exported with a metre affine: same geometry
        for path in (*case.image_paths, case.label_path):
            volume = read_volume(path)
            write_in_unit(volume.array, volume.affine, path, "meter")
    assert cli_main(["check", f"root={distributed_dataset}", "workers=0"]) == 0
    assert "median (2.0" in capsys.readouterr().out  # mm, not 0.002

    bad = cases[0]
    for path in (*bad.image_paths, bad.label_path):  # metre values in a header without a unit
        volume = read_volume(path)
        write_nifti(volume.array, np.diag([1e-3, 1e-3, 1e-3, 1.0]) @ volume.affine, path)
    assert cli_main(["check", f"root={distributed_dataset}", "workers=0"]) == 1
    err = capsys.readouterr().err
    assert str(bad.image_paths[0]) in err and "expected voxel spacing from 0.1 to 20 mm" in err
    assert "0.002" in err


def _lying_header(path, shape_xyz, gzipped: bool):
    """Overwrite dim[1..3] of a NIfTI-1 header: the file keeps its few voxels but declares ``shape_xyz``."""
    raw = bytearray(gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes())
    order = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    raw[42:48] = struct.pack(f"{order}3h", *shape_xyz)
    path.write_bytes(gzip.compress(bytes(raw)) if gzipped else bytes(raw))


def test_header_declaring_a_huge_image_is_refused_before_reading(tmp_path):
    path = write_nifti(np.ones((4, 4, 4), np.int16), lps_affine(), tmp_path / "huge_0000.nii")
    _lying_header(path, (1500, 1500, 800), gzipped=False)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as error:
            read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(error.value)
    assert str(path) in message and "(1500, 1500, 800)" in message
    assert "1,000,000,000" in message and "max_image_voxels" in message
    assert peak < 20 * 2**20  # the 3.6 GB array was never allocated


def test_gzip_whose_header_lies_is_refused_at_load_with_the_configured_limit(tmp_path):
    image, mask = make_case_arrays(np.random.default_rng(0))
    case = _case(tmp_path, "lying", image, mask, lps_affine())
    _lying_header(case.image_paths[0], (40, 40, 40), gzipped=True)
    with pytest.raises(DataError) as error:
        load_case(case, limits=InputLimits.from_config({"max_image_voxels": 50_000}))
    message = str(error.value)
    assert "case lying" in message and str(case.image_paths[0]) in message
    assert "(40, 40, 40), 64,000 voxels" in message and "50,000" in message


def test_preprocess_refuses_a_resampled_shape_over_the_limit_before_allocating(tmp_path, monkeypatch):
    image, mask = make_case_arrays(np.random.default_rng(0))  # (12, 28, 36) at (2, 0.8, 0.8) mm
    loaded = load_case(_case(tmp_path, "big", image, mask, lps_affine()))

    def must_not_run(*args, **kwargs):
        raise AssertionError("resampled before the size check")

    monkeypatch.setattr("pancreas_mtl.dataset.preprocessing.resample_image", must_not_run)
    monkeypatch.setattr("pancreas_mtl.dataset.preprocessing.normalize", must_not_run)
    with pytest.raises(DataError) as error:
        preprocess(loaded, small_plan(target_spacing=(0.5, 0.2, 0.2)), max_resampled_voxels=100_000)
    message = str(error.value)
    assert "case big" in message and str(loaded.case.image_paths[0]) in message
    assert "(2.0, 0.8, 0.8)" in message and "(0.5, 0.2, 0.2)" in message  # spacing and target spacing
    assert "100,000" in message and "max_resampled_voxels" in message
    shape = tuple(int(s) for s in message.split("would give shape (")[1].split(")")[0].split(","))
    assert np.prod(shape) > 100_000


def test_cache_lists_cases_over_the_resampled_limit(distributed_dataset, tmp_path):
    index = discover(distributed_dataset)
    root = dataset_cache_root(tmp_path / "cache", index)
    with pytest.raises(DatasetError) as error:
        build_cache(index, small_plan(), root, cases=index.labelled, progress=False,
                    limits=InputLimits.from_config({"max_resampled_voxels": 1000}))
    assert len(error.value.problems) == len(index.labelled)
    assert all("max_resampled_voxels" in problem.message for problem in error.value.problems)


@pytest.mark.parametrize("limits, found", [
    ({"max_spacing_mm": 1.5}, "expected voxel spacing from 0.1 to 1.5 mm"),   # the fingerprint pass
    ({"max_resampled_voxels": 1000}, "1,000; raise data.limits.max_resampled_voxels"),  # the cache
], ids=["spacing", "resampled_size"])
def test_training_takes_the_limits_from_the_data_config(distributed_dataset, tmp_path, limits, found):
    with pytest.raises(DatasetError) as error:
        prepare_dataset(data_cfg(distributed_dataset, tmp_path / "cache", limits=limits), small_planning(),
                        progress=False)
    assert found in str(error.value)


def test_itk_header_declaring_too_many_voxels_is_refused(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.GetImageFromArray(np.ones((4, 5, 6), np.int16))  # (z, y, x) -> ITK size (6, 5, 4)
    image.SetSpacing((0.8, 0.8, 2.0))
    path = tmp_path / "c_0000.mha"
    sitk.WriteImage(image, str(path))
    assert read_volume(path).spacing == pytest.approx((2.0, 0.8, 0.8))
    with pytest.raises(DataError, match=r"shape \(x, y, z\) \(6, 5, 4\), 120 voxels, expected at most 100;"):
        read_volume(path, max_voxels=100)
