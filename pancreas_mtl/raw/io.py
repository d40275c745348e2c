"""Reading and writing 3D images: NIfTI through nibabel, NRRD/MHA through SimpleITK.

Axis order is where this code meets the files. On disk (NIfTI) voxels are indexed (x, y, z) = (i, j, k)
and the affine maps (i, j, k, 1) to RAS+ coordinates in the header's spatial unit (``xyzt_units``:
metres, millimetres or micrometres; unknown counts as millimetres). In memory every array of this
project is (Z, Y, X): ``array[k, j, i]``, and every affine is in millimetres: the file's affine scaled
by its unit and otherwise kept exactly as the file has it. ``write_nifti`` with the source's header
scales it back, so a mask written beside its image has the image's header and affine.

A file is refused before its voxels are read when its header declares more voxels than a limit
(``InputLimits.max_image_voxels``): a small ``.nii.gz`` can declare an array larger than the memory.
Voxels must be real integers or floats: complex, boolean (NIfTI's 1-bit ``binary``) and RGB files are
refused by name, for images and masks alike.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from pancreas_mtl.raw.errors import DataError
from pancreas_mtl.raw.limits import InputLimits, config_key
from pancreas_mtl.files import atomic_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES

# ITK stores geometry in LPS; NIfTI affines are RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Millimetres per NIfTI spatial unit (header ``xyzt_units``); ITK geometry is always in mm.
_MM_PER_NIFTI_UNIT = {"meter": 1000.0, "mm": 1.0, "micron": 0.001, "unknown": 1.0}


@dataclass
class Volume:
    """A 3D image in tensor axis order.

    Attributes:
        array: voxels, shape (Z, Y, X), dtype as stored in the file.
        affine: 4x4 matrix mapping voxel index (x, y, z, 1) to RAS+ mm, as NIfTI stores it (scaled to mm
            from the header's spatial unit).
    """

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, (z, y, x)."""
        return spacing_from_affine(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (z, y, x) in mm: the lengths of the affine's (x, y, z) columns, reversed."""
    column_lengths = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(float(s) for s in column_lengths[::-1])


def image_suffix(path: str | Path) -> str | None:
    """The supported suffix ``path`` ends with (``.nii.gz`` before ``.nii``), or None."""
    name = str(path).lower()
    return next((suffix for suffix in SUPPORTED_SUFFIXES if name.endswith(suffix)), None)


def strip_suffix(path: str | Path) -> str:
    """File name without its image suffix: ``quiz_0_041_0000.nii.gz`` -> ``quiz_0_041_0000``."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def read_volume(path: str | Path, max_voxels: int | None = None) -> Volume:
    """Read a 3D image; every failure is a DataError that names the file and the reason.

    Args:
        max_voxels: most voxels the header may declare, checked before the voxels are read; None:
            ``InputLimits.defaults().max_image_voxels`` (``data.limits.max_image_voxels`` in the config).
    """
    path = Path(path)
    max_voxels = InputLimits.defaults().max_image_voxels if max_voxels is None else int(max_voxels)
    suffix = image_suffix(path)
    if suffix is None:
        raise DataError(path, f"unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    if suffix in NIFTI_SUFFIXES:
        array, affine = _read_nifti(path, max_voxels)
    else:
        array, affine = _read_itk(path, max_voxels)
    if array.ndim != 3:
        raise DataError(path, f"expected a 3D image, found {array.ndim}D with shape {tuple(array.shape)} (x, y, z, ...)")
    return Volume(array=array, affine=affine)


def check_voxel_type(path: Path, dtype: np.dtype, found: str | None = None) -> None:
    """Refuse voxels that are not real integers or floats (``found``: how to name the type, default the
    dtype's name). A complex image would otherwise become float32 with its imaginary part dropped and only
    a numpy warning; an RGB one fails later without naming the file."""
    dtype = np.dtype(dtype)
    if dtype.names is None and dtype != np.bool_ and (np.issubdtype(dtype, np.integer)
                                                       or np.issubdtype(dtype, np.floating)):
        return
    if dtype.names is not None:
        found, advice = found or f"{'/'.join(dtype.names)} (a colour image)", "save one grey-value channel"
    elif np.issubdtype(dtype, np.complexfloating):
        found, advice = found or dtype.name, "save its magnitude (numpy.abs) or real part as float32"
    elif dtype == np.bool_:
        found, advice = found or dtype.name, "save it as uint8 (a mask: labels 0 and 1)"
    else:
        found, advice = found or str(dtype), "save it as integers or floats"
    raise DataError(path, f"voxels are {found}; expected real integer or floating voxels (CT intensities or "
                          f"mask labels): {advice}")


def check_declared_size(path: Path, shape_xyz: tuple[int, ...], max_voxels: int) -> None:
    """Refuse an image whose declared shape (file order, x y z ...) has more than ``max_voxels`` voxels."""
    voxels = int(np.prod([int(s) for s in shape_xyz], dtype=np.float64))
    if voxels > max_voxels:
        raise DataError(path, f"header declares shape (x, y, z) {tuple(int(s) for s in shape_xyz)}, "
                              f"{voxels:,} voxels, expected at most {max_voxels:,}; raise "
                              f"{config_key('max_image_voxels')} for a genuinely larger image")


def mm_per_header_unit(header) -> float:
    """Millimetres per unit of a NIfTI header's affine (``xyzt_units``); 1 for unknown or invalid codes."""
    try:
        unit = header.get_xyzt_units()[0]
    except (AttributeError, KeyError):  # not a NIfTI header, or a unit code NIfTI does not define
        return 1.0
    return _MM_PER_NIFTI_UNIT.get(unit, 1.0)


def _unreadable_nifti(path: Path, exc: Exception) -> DataError:
    return DataError(path, "cannot read NIfTI, the file is truncated or not an image "
                           f"({type(exc).__name__}: {exc})")


def _read_nifti(path: Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    unreadable = (EOFError, zlib.error, OSError, ValueError, nib.filebasedimages.ImageFileError)
    try:
        image = nib.load(str(path))  # the header only; the voxels are read below
    except nib.spatialimages.HeaderDataError as exc:
        header = _raw_header(path)
        if header is not None and header.datatype == 1:  # DT_BINARY, which nibabel does not read
            check_voxel_type(path, np.bool_, "binary, 1 bit per voxel (NIfTI datatype 1)")
        raise _unreadable_nifti(path, exc) from exc
    except unreadable as exc:
        raise _unreadable_nifti(path, exc) from exc
    check_declared_size(path, image.shape, max_voxels)
    check_voxel_type(path, image.header.get_data_dtype())  # before the voxels are read
    try:
        data = np.asanyarray(image.dataobj)
    except unreadable as exc:
        raise _unreadable_nifti(path, exc) from exc
    affine = np.asarray(image.affine, dtype=np.float64).copy()
    affine[:3, :] *= mm_per_header_unit(image.header)
    header = _raw_header(path)
    header_spacing = header.pixdim if header is not None else None
    if header_spacing is not None and (np.any(header_spacing <= 0) or not np.all(np.isfinite(header_spacing))):
        raise DataError(path, f"header voxel spacing (pixdim, x y z) must be positive, found {tuple(header_spacing)}")
    # A trailing singleton axis (x, y, z, 1) is still a 3D volume.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        return data, affine
    return np.ascontiguousarray(data.transpose(2, 1, 0)), affine


@dataclass(frozen=True)
class _RawHeader:
    """NIfTI header fields as written in the file: nibabel silently replaces a zero pixdim by 1 on load
    (a broken header would read as a plausible but wrong 1 mm spacing) and refuses some datatypes."""

    datatype: int
    pixdim: np.ndarray  # pixdim[1:4]: x, y, z


def _raw_header(path: Path) -> _RawHeader | None:
    """The NIfTI-1 or NIfTI-2 header fields of ``path``; None for a file nibabel reports as unreadable."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            block = stream.read(540)
    except (OSError, EOFError, zlib.error):
        return None  # nibabel reports the unreadable file
    # (header size, datatype offset, pixdim offset, pixdim type) of NIfTI-1 and NIfTI-2
    for size, type_offset, offset, code in ((348, 70, 76, "f"), (540, 12, 104, "d")):
        for order in "<>":
            if len(block) >= size and struct.unpack(order + "i", block[:4])[0] == size:
                datatype = struct.unpack(order + "h", block[type_offset:type_offset + 2])[0]
                pixdim = struct.unpack(f"{order}4{code}", block[offset:offset + 4 * struct.calcsize(code)])
                return _RawHeader(datatype, np.asarray(pixdim[1:4]))
    return None


def _read_itk(path: Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise DataError(path, "reading .nrrd/.mha needs SimpleITK: pip install 'pancreas_mtl[itk]'") from exc
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # the header only
        check_declared_size(path, reader.GetSize(), max_voxels)
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(path, f"cannot read image, the file is truncated or not an image ({exc})") from exc
    array = sitk.GetArrayFromImage(image)  # already (z, y, x)
    check_voxel_type(path, array.dtype)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        return array, np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps_affine = np.eye(4)
    lps_affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps_affine[:3, 3] = image.GetOrigin()
    return array, _LPS_TO_RAS @ lps_affine


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path, header: nib.Nifti1Header | None = None) -> Path:
    """Write a (Z, Y, X) array as NIfTI atomically: a temporary name in the same folder, then a rename.

    ``affine`` is in mm (as ``read_volume`` returns it); with a ``header`` whose spatial unit is not mm
    it is stored in that unit, so a mask written with its image's header has the image's affine.
    A reader never sees a half-written file under ``path``, even if the process is killed.
    """
    path = Path(path)
    if image_suffix(path) not in NIFTI_SUFFIXES:
        raise ValueError(f"{path}: write_nifti writes .nii.gz or .nii, not {path.suffix}")
    if header is not None:
        affine = np.asarray(affine, dtype=np.float64).copy()
        affine[:3, :] /= mm_per_header_unit(header)
    image = nib.Nifti1Image(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)), affine, header=header)
    image.set_data_dtype(array.dtype)
    with atomic_path(path, suffix=image_suffix(path)) as tmp:
        nib.save(image, str(tmp))
    return path
