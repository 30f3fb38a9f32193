"""Image preprocessing: bit-for-bit parity with transformers.CLIPImageProcessor, and errors."""

import io

import numpy as np
import pytest
from PIL import Image

from infllava_jax.data import images


@pytest.fixture(scope="module")
def processor():
  from transformers import CLIPImageProcessor
  # The reference multiplies the CLIP-336 sizes by 3; here the model's resolution is 84.
  return CLIPImageProcessor(size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84})


def _image(w, h, mode, seed):
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
  base = Image.fromarray(arr if mode in ("RGBA", "CMYK") else arr[..., :3],
                         "RGBA" if mode in ("RGBA", "CMYK") else "RGB")
  return base.convert(mode)


@pytest.mark.parametrize("w, h, mode", [(97, 61, "RGB"), (50, 123, "L"), (301, 77, "P"),
                                        (84, 84, "RGBA"), (33, 35, "CMYK"), (413, 257, "RGB")])
@pytest.mark.parametrize("aspect", ["square", "pad"])
def test_matches_clip_image_processor_bitwise(processor, w, h, mode, aspect):
  img = _image(w, h, mode, seed=w * h)
  ours = images.preprocess(img, 84, aspect)
  # The reference dataset converts with PIL first, then (pad) expands to square.
  ref_in = img.convert("RGB")
  if aspect == "pad":
    ref_in = images.expand_to_square(ref_in)
  ref = processor(images=ref_in, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  assert ours.dtype == np.float32 and ours.shape == (84, 84, 3)
  np.testing.assert_array_equal(ours, ref)


def test_pad_uses_mean_colour_and_centres():
  img = Image.new("RGB", (40, 20), (255, 0, 0))
  square = images.expand_to_square(img)
  assert square.size == (40, 40) and images.PAD_COLOUR == (122, 116, 104)
  arr = np.asarray(square)
  assert (arr[:10] == (122, 116, 104)).all() and (arr[30:] == (122, 116, 104)).all()
  assert (arr[10:30] == (255, 0, 0)).all()


def test_exif_orientation_is_ignored_as_by_the_reference():
  # The reference reads images with Image.open(path).convert('RGB'), which keeps the stored
  # pixel layout whatever the EXIF orientation tag says; the released weights saw that.
  img = Image.new("RGB", (30, 10), (0, 0, 255))
  img.paste((255, 255, 0), (0, 0, 5, 10))
  exif = Image.Exif()
  exif[0x0112] = 6  # a viewer would rotate it 90 degrees clockwise to display
  buf = io.BytesIO()
  img.save(buf, format="JPEG", exif=exif, quality=95)
  decoded = images.decode(buf.getvalue())
  reference = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
  assert decoded.size == reference.size == (30, 10)
  np.testing.assert_array_equal(np.asarray(decoded), np.asarray(reference))


def test_accepts_path_bytes_and_arrays(tmp_path):
  arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  path = tmp_path / "x.png"
  Image.fromarray(arr).save(path)
  a = images.preprocess(str(path), 42)
  b = images.preprocess(path.read_bytes(), 42)
  c = images.preprocess(arr, 42)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)


def test_bucket_paths_are_read_through_epath(tmp_path):
  """A gs:// image (a LLaVA JSON's data.image_folder on a bucket) is read through
  etils.epath; its test mock maps gs://bucket to a local folder."""
  from etils.epath import testing as epath_testing
  arr = np.random.default_rng(1).integers(0, 256, (12, 16, 3), dtype=np.uint8)
  Image.fromarray(arr).save(tmp_path / "x.png")
  calls = []

  def local(fn, path, *args, **kwargs):
    calls.append(str(path))
    return fn(str(path).replace("gs://bucket", str(tmp_path)), *args, **kwargs)

  with epath_testing.mock_epath(open=local, exists=local, isdir=local, stat=local):
    np.testing.assert_array_equal(np.asarray(images.decode("gs://bucket/x.png")), arr)
    with pytest.raises(images.ImageError, match=r"gs://bucket/gone\.png.*not found"):
      images.decode("gs://bucket/gone.png")
  assert "gs://bucket/x.png" in calls


def test_zero_image():
  z = images.zero_image(84)
  assert z.shape == (84, 84, 3) and z.dtype == np.float32 and not z.any()


def test_missing_file_names_it(tmp_path):
  with pytest.raises(images.ImageError, match=r"nope\.jpg.*not found"):
    images.decode(str(tmp_path / "nope.jpg"))


def test_corrupt_file_names_it(tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  with pytest.raises(images.ImageError, match=r"cannot decode image .*bad\.png"):
    images.decode(str(bad))


def test_truncated_file_is_an_error(tmp_path):
  buf = io.BytesIO()
  Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
  with pytest.raises(images.ImageError, match="cannot decode"):
    images.decode(buf.getvalue()[:200])
