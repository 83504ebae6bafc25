"""Tests for the FID InceptionV3 (architecture, weight loading, torch-format reader, FID plumbing).

Reference numbers below were produced once with PyTorch 2.13 running pytorch-fid's FID Inception
definition (FIDInceptionA/C/E_1/E_2 on torchvision's Inception3) with the weights of
`_fake_state_dict`; torch is not needed to run these tests.
"""
import base64
import collections
import io
import os
import pickle
import re
import sys
import types
import zipfile
import zlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fixed_slots.eval import inception
from fixed_slots.eval import metrics, torch_pickle


def _fake_state_dict(shapes):
    """Deterministic random weights per PyTorch key (seeded by the key name, order-free)."""
    sd = {}
    for key, shape in shapes.items():
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        if key.endswith("conv.weight"):
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            v = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("bn.running_var"):
            v = rng.uniform(0.5, 2.0, shape)
        else:
            v = rng.uniform(-0.2, 0.2, shape)
        sd[key] = v.astype(np.float32)
    return sd


def _full_checkpoint(shapes):
    """What the real .pth holds: the used weights plus fc and BatchNorm step counters."""
    sd = _fake_state_dict(shapes)
    for key in shapes:
        if key.endswith(".bn.weight"):
            sd[key.replace(".weight", ".num_batches_tracked")] = np.array(0, np.int64)
    sd["fc.weight"] = np.zeros((1008, 2048), np.float32)
    sd["fc.bias"] = np.zeros((1008,), np.float32)
    return sd


# (name, in, out, kernel (h, w)) of every BasicConv2d, transcribed from torchvision's
# Inception3/InceptionA-E and pytorch-fid's fid_inception_v3.
def _pytorch_fid_convs():
    convs = [("Conv2d_1a_3x3", 3, 32, (3, 3)), ("Conv2d_2a_3x3", 32, 32, (3, 3)),
             ("Conv2d_2b_3x3", 32, 64, (3, 3)), ("Conv2d_3b_1x1", 64, 80, (1, 1)),
             ("Conv2d_4a_3x3", 80, 192, (3, 3))]

    def block_a(name, cin, pool):
        return [(f"{name}.branch1x1", cin, 64, (1, 1)), (f"{name}.branch5x5_1", cin, 48, (1, 1)),
                (f"{name}.branch5x5_2", 48, 64, (5, 5)),
                (f"{name}.branch3x3dbl_1", cin, 64, (1, 1)),
                (f"{name}.branch3x3dbl_2", 64, 96, (3, 3)),
                (f"{name}.branch3x3dbl_3", 96, 96, (3, 3)),
                (f"{name}.branch_pool", cin, pool, (1, 1))]

    def block_c(name, c7):
        return [(f"{name}.branch1x1", 768, 192, (1, 1)), (f"{name}.branch7x7_1", 768, c7, (1, 1)),
                (f"{name}.branch7x7_2", c7, c7, (1, 7)), (f"{name}.branch7x7_3", c7, 192, (7, 1)),
                (f"{name}.branch7x7dbl_1", 768, c7, (1, 1)),
                (f"{name}.branch7x7dbl_2", c7, c7, (7, 1)),
                (f"{name}.branch7x7dbl_3", c7, c7, (1, 7)),
                (f"{name}.branch7x7dbl_4", c7, c7, (7, 1)),
                (f"{name}.branch7x7dbl_5", c7, 192, (1, 7)),
                (f"{name}.branch_pool", 768, 192, (1, 1))]

    def block_e(name, cin):
        return [(f"{name}.branch1x1", cin, 320, (1, 1)), (f"{name}.branch3x3_1", cin, 384, (1, 1)),
                (f"{name}.branch3x3_2a", 384, 384, (1, 3)),
                (f"{name}.branch3x3_2b", 384, 384, (3, 1)),
                (f"{name}.branch3x3dbl_1", cin, 448, (1, 1)),
                (f"{name}.branch3x3dbl_2", 448, 384, (3, 3)),
                (f"{name}.branch3x3dbl_3a", 384, 384, (1, 3)),
                (f"{name}.branch3x3dbl_3b", 384, 384, (3, 1)),
                (f"{name}.branch_pool", cin, 192, (1, 1))]

    convs += block_a("Mixed_5b", 192, 32) + block_a("Mixed_5c", 256, 64)
    convs += block_a("Mixed_5d", 288, 64)
    convs += [("Mixed_6a.branch3x3", 288, 384, (3, 3)),
              ("Mixed_6a.branch3x3dbl_1", 288, 64, (1, 1)),
              ("Mixed_6a.branch3x3dbl_2", 64, 96, (3, 3)),
              ("Mixed_6a.branch3x3dbl_3", 96, 96, (3, 3))]
    convs += block_c("Mixed_6b", 128) + block_c("Mixed_6c", 160) + block_c("Mixed_6d", 160)
    convs += block_c("Mixed_6e", 192)
    convs += [("Mixed_7a.branch3x3_1", 768, 192, (1, 1)),
              ("Mixed_7a.branch3x3_2", 192, 320, (3, 3)),
              ("Mixed_7a.branch7x7x3_1", 768, 192, (1, 1)),
              ("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7)),
              ("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)),
              ("Mixed_7a.branch7x7x3_4", 192, 192, (3, 3))]
    convs += block_e("Mixed_7b", 1280) + block_e("Mixed_7c", 2048)
    return convs


@pytest.fixture(scope="module")
def model_and_weights(tmp_path_factory):
    model = inception.FIDInceptionV3()
    sd = _full_checkpoint(inception.torch_state_dict_shapes(model))
    path = tmp_path_factory.mktemp("weights") / "fid_inception.npz"
    np.savez(path, **sd)
    inception.load_fid_inception_weights(model, str(path))
    return model, sd, str(path)


def test_state_dict_keys_match_pytorch_fid():
    model = nnx.eval_shape(lambda: inception.FIDInceptionV3())
    shapes = inception.torch_state_dict_shapes(model)
    convs = _pytorch_fid_convs()
    assert len(convs) == 94
    want = {}
    for name, cin, cout, (kh, kw) in convs:
        want[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            want[f"{name}.bn.{leaf}"] = (cout,)
    assert shapes == want


def _numpy_basic_conv(x_nchw, sd, name, stride=1, padding=(0, 0)):
    """Independent reference: conv (OIHW, cross-correlation) -> BN(eps=1e-3) -> ReLU, NCHW."""
    w = sd[f"{name}.conv.weight"].astype(np.float64)
    o, c, kh, kw = w.shape
    ph, pw = padding
    x = np.pad(x_nchw.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out_h = (x.shape[2] - kh) // stride + 1
    out_w = (x.shape[3] - kw) // stride + 1
    y = np.zeros((x.shape[0], o, out_h, out_w))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * out_h:stride, j:j + stride * out_w:stride]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    scale = sd[f"{name}.bn.weight"] / np.sqrt(sd[f"{name}.bn.running_var"] + 1e-3)
    y = (y - sd[f"{name}.bn.running_mean"][:, None, None]) * scale[:, None, None]
    return np.maximum(y + sd[f"{name}.bn.bias"][:, None, None], 0)


def test_weight_roundtrip_layer_matches_numpy(model_and_weights):
    model, sd, _ = model_and_weights
    rng = np.random.default_rng(0)
    checks = [(model.Mixed_5b.branch5x5_2, "Mixed_5b.branch5x5_2", 48, 1, (2, 2)),
              (model.Mixed_6b.branch7x7_2, "Mixed_6b.branch7x7_2", 128, 1, (0, 3)),
              (model.Mixed_6a.branch3x3, "Mixed_6a.branch3x3", 288, 2, (0, 0))]
    for block, name, cin, stride, padding in checks:
        x = rng.normal(size=(2, cin, 9, 10)).astype(np.float32)
        got = np.asarray(block(jnp.asarray(x.transpose(0, 2, 3, 1))))
        want = _numpy_basic_conv(x, sd, name, stride, padding).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    np.testing.assert_array_equal(model.Conv2d_1a_3x3.conv.kernel.get_value(),
                                  sd["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.Mixed_7c.branch_pool.bn.var.get_value(),
                                  sd["Mixed_7c.branch_pool.bn.running_var"])


def test_forward_small_input_without_resize(model_and_weights):
    model, _, _ = model_and_weights
    small = nnx.clone(model)
    small.resize_input = False
    images = np.random.default_rng(0).random((2, 75, 75, 3)).astype(np.float32)
    feats = jax.jit(lambda x: small(x))(images)
    assert feats.shape == (2, inception.FEATURE_DIM) and feats.dtype == jnp.float32
    assert np.isfinite(np.asarray(feats)).all() and float(feats.min()) >= 0  # post-ReLU mean


# pytorch-fid's network (torch) on the 40x48 input below, resized to 299, with _fake_state_dict.
_TORCH_FEATURE_IDX = [0, 1, 2, 100, 500, 1000, 1500, 2047]
_TORCH_FEATURES = [1.19039941, 0.10387579, 0.0, 0.04833043, 0.10236283, 0.36832434, 0.18148392, 0.0]
_TORCH_MEAN, _TORCH_STD = 0.5232815742492676, 0.7426740527153015


def test_forward_matches_pytorch_fid_reference(model_and_weights):
    model, _, _ = model_and_weights
    x = np.random.default_rng(1).random((1, 40, 48, 3)).astype(np.float32)
    feats = np.asarray(inception.inception_activations(model, x, batch_size=1))[0]
    np.testing.assert_allclose(feats[_TORCH_FEATURE_IDX], _TORCH_FEATURES, rtol=1e-4, atol=1e-5)
    assert feats.mean() == pytest.approx(_TORCH_MEAN, rel=1e-5)
    assert feats.std() == pytest.approx(_TORCH_STD, rel=1e-5)


# torch.nn.functional.interpolate(x, size, mode="bilinear", align_corners=False)[0, 1] for
# x = arange(70).reshape(1, 2, 5, 7) / 70.
_TORCH_RESIZE = {
    (3, 4): [[0.5386904, 0.5636905, 0.5886905, 0.6136904],
             [0.7053571, 0.7303571, 0.7553571, 0.7803571],
             [0.8720238, 0.8970238, 0.9220238, 0.9470237]],
    (9, 11): [[0.5, 0.5064935, 0.5155845, 0.5246753, 0.5337663, 0.5428572, 0.5519481, 0.561039,
               0.5701299, 0.5792208, 0.5857143],
              [0.5333334, 0.5398269, 0.5489178, 0.5580087, 0.5670996, 0.5761905, 0.5852814,
               0.5943723, 0.6034632, 0.6125541, 0.6190476],
              [0.5888889, 0.5953824, 0.6044733, 0.6135643, 0.6226552, 0.6317461, 0.640837,
               0.6499279, 0.6590188, 0.6681097, 0.6746032],
              [0.6444445, 0.650938, 0.6600288, 0.6691198, 0.6782107, 0.6873016, 0.6963925,
               0.7054834, 0.7145743, 0.7236652, 0.7301587],
              [0.7, 0.7064935, 0.7155845, 0.7246754, 0.7337663, 0.7428572, 0.7519481, 0.761039,
               0.7701299, 0.7792208, 0.7857143],
              [0.7555556, 0.7620491, 0.77114, 0.7802309, 0.7893218, 0.7984127, 0.8075036,
               0.8165945, 0.8256854, 0.8347763, 0.8412699],
              [0.8111111, 0.8176046, 0.8266956, 0.8357864, 0.8448773, 0.8539683, 0.8630592,
               0.8721501, 0.881241, 0.8903319, 0.8968254],
              [0.8666667, 0.8731602, 0.8822511, 0.891342, 0.9004329, 0.9095238, 0.9186147,
               0.9277056, 0.9367966, 0.9458874, 0.952381],
              [0.9, 0.9064935, 0.9155844, 0.9246753, 0.9337662, 0.9428571, 0.951948, 0.9610389,
               0.9701298, 0.9792207, 0.9857143]],
}


def test_resize_matches_torch_bilinear():
    x = (np.arange(70, dtype=np.float32).reshape(1, 2, 5, 7) / 70.0).transpose(0, 2, 3, 1)
    for (h, w), want in _TORCH_RESIZE.items():
        got = np.asarray(inception.resize_bilinear(jnp.asarray(x), h, w))[0, :, :, 1]
        np.testing.assert_allclose(got, want, atol=2e-7)


# torch.save({"a.weight": arange(6.).reshape(2, 3), "a.bn.num_batches_tracked": tensor(7),
#             "b": arange(12., dtype=float64).reshape(3, 4).t()[1:] (a strided view, offset 1),
#             "c": tensor([1.5, -2.0], dtype=float16)}) by torch 2.13, zlib + base64:
# the default zip format and `_use_new_zipfile_serialization=False` (the legacy format that
# pre-1.6 checkpoints such as pt_inception-2015-12-05 use).
_TORCH_ZIP = (
    "eNqlVc9P01Acf+tGNyrIQJQhCAiII8rYOuiGBiENNiY1EWY0i5fSdWVrKCuve4PACWMg8WCiCRcvxrMHr3r0X9AETt6M"
    "QU9yNHrx9QejLWFDeNvbt22+n8/38/b90VneHwAgFAJHViv+IKW0Jqwry6N5EYmx5UWVY5vBE+faICRJU1VZQopWKlMP"
    "9Lysy/kZRUIUBMMZ6ItmDW4xtiorhSKChIQ0XSrGhApS1DIl6HKuoqh5AcmlsqYLKzQF/dFoNogxZewpFmQYsCAUp2oi"
    "emg9pGBD1od94pDM+rGVliswyJMIhuZ4wBO8fws28n7etwWp50VDxzkEmzKwORsxxeRKsVJlSciJSCrKZQHporQo5+H5"
    "Io5dPIh3XysVquFazHAJGC4GeR+CrTjM8LBF3YbghQxsNx1y8KKLY0ar5FS5ynLJdKJhB2ZpQjAyx/uwSiy2E18EtuBl"
    "i7ELwe4MvGI6S7DHxXhPVBeqfL2mSxL2YT4Cwavm4TdhP+/bhAMW1yCC1zJwqBKb5YMhvlL++w5DjD17bOYjIHyY+diC"
    "pi+JSFiR9TJOMcc2uQogYdB++PX1mSHE2MfTdgHGQWtnVxBVpVBakkuIY2l3aZ1oMWOGgKlV+JPAIYiaAtrAnUMBuTUk"
    "a0a1cuytU8Q9WKqCkCobGjYnv3WSOApZU0MLmHR31WicYydOL8Bi3ZjCP9P4i/cG3m+nDUUdL/deRcx81lZ0w6MowbHX"
    "T6ooaLMY8ZZ39zQjQKhOvNueeDTHpsCZzn+w9qfsi2nLhGwbtm27bSO27bZtn237bTto2yHzf9wPvv49j+/m65xrwHOu"
    "JMf21jsXLslPRgxmZ2cbE4NAzRhhZwVXO/Is9ZukjOif3xQe1e+fXpBwNLB5xLKsK7iD10Vj/AtKnmNH/k9MIp5KpRk6"
    "RU+kJibS42MJhh6Px8fS+Hk6STPMGM2Mp5l43FD5/vvu0yjWETVV+ggzw7ZO52RrPaL8yHvMC3dOsIgL+scHjh2GXhbn"
    "GOpyscwRoNbs8xI5Z0mbi+iLk6g6w7x4Z+e3uPCP/cA7f7xgZxu7wT+OgBNesLNX3OBswAumvWBnE7jB8QYvOOkFO2s4"
    "7AJvO8HHpM5ZW73utwYJ6lX9LE+SN233Hv9IFUp57AvCsh/Jg6FJmvPzbqN1b70/G0gLQ5n+lu8/Rj8WaQ==")
_TORCH_LEGACY = (
    "eNptkstu00AUhn3LBZOWAAVSKBBKqZJNRN3EJBuaRVUhDbeazWyQ5csQG4ydY4+LQKqUTSPgGViw5DF4HXZskVhwEk8j"
    "BcXS+B/PnPn+c854onzVo7/fjv403/54udmZKM9+qfg+BalF65IkjdOEJ14S2ScszcIkBhkD6BruRCHnEbNZ7IdODMpn"
    "quMi/zhmdhZ+Yhmop6C1aAkXsyBJOZSIQlX8CmMOZaJRbcZI4hFUiJbn6OmhTcQ8ji6Z/iL1Wcr8w9DjOkhtC+QWreIJ"
    "p/OBhaOAg+LxJPWCjp3zMMp0O2VuHka+zVmcJal9Yuigtlq0MvPHSGfEQCuO6EdR4vBXxaIOJbqOMYPu/sDs7+3v9Xvd"
    "7kMoz1P1xjlmV37OoXpMJKIQdQoXiErkKehfgllWFznULFijjXlqbtyJ8/e263AvYJnNU8d7x3xYDzCT4Nz9Kda8ML+0"
    "ZG4aRu+RCfWgQmQ0vYym7XZhdIXDVQs2qIzhLlxbIh4muRuxBfP6ckGm2RsYcAOZNWQ2jomMFWAhmzjRpnCz4N/isGXB"
    "7TnfgztL/CdO9GZBv/tfu0yj34cm0hWk35u36Qy2iXwG9wvyDocHFuzObvj17K9akZy86gqUVUbqqn5prFOTVj2/D8Rk"
    "WEhVaF3ohtCG0C2hTaHbQneE7g7LS/zJQcEe4pjg+D5UzrceSz9lMa0I/QfxCcfl")


@pytest.mark.parametrize("blob", [_TORCH_ZIP, _TORCH_LEGACY], ids=["zip", "legacy"])
def test_reader_on_torch_saved_files(tmp_path, blob):
    path = tmp_path / "tiny.pth"
    path.write_bytes(zlib.decompress(base64.b64decode(blob)))
    sd = torch_pickle.read_torch_state_dict(str(path), use_torch=False)
    assert list(sd) == ["a.weight", "a.bn.num_batches_tracked", "b", "c"]
    np.testing.assert_array_equal(sd["a.weight"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert sd["a.weight"].dtype == np.float32
    assert sd["a.bn.num_batches_tracked"].dtype == np.int64 and sd["a.bn.num_batches_tracked"] == 7
    np.testing.assert_array_equal(sd["b"], np.arange(12.0).reshape(3, 4).T[1:])
    assert sd["b"].dtype == np.float64
    np.testing.assert_array_equal(sd["c"], np.array([1.5, -2.0], np.float16))


def _write_torch_zip(path, state_dict, monkeypatch, views=None):
    """Writes `state_dict` in torch.save's zip layout (data.pkl + data/<key> blobs).

    `views` maps a key to the (offset, sizes, strides) its tensor claims over its storage (the
    array's own layout otherwise): how a crafted file describes a view outside its storage.
    """
    views = dict(views or {})
    fake_torch = types.ModuleType("torch")
    fake_utils = types.ModuleType("torch._utils")
    storage_types = {}
    for name in ("FloatStorage", "LongStorage"):
        storage_types[name] = type(name, (), {"__module__": "torch"})
        setattr(fake_torch, name, storage_types[name])

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled here, never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    fake_torch._utils = fake_utils

    class Storage:
        def __init__(self, key, array):
            self.key, self.array = key, array

    class Tensor:
        def __init__(self, storage, view=None):
            self.storage, self.view = storage, view

        def __reduce_ex__(self, protocol):
            a = self.storage.array
            offset, shape, stride = self.view or (0, a.shape,
                                                  tuple(s // a.itemsize for s in a.strides))
            return (_rebuild_tensor_v2,
                    (self.storage, offset, shape, stride, False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                kind = "LongStorage" if obj.array.dtype == np.int64 else "FloatStorage"
                return ("storage", storage_types[kind], obj.key, "cpu", obj.array.size)
            return None

    storages = [Storage(str(i), np.ascontiguousarray(v)) for i, v in enumerate(state_dict.values())]
    payload = collections.OrderedDict(
        (k, Tensor(s, views.get(k))) for k, s in zip(state_dict, storages))
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", fake_torch)
        m.setitem(sys.modules, "torch._utils", fake_utils)
        Pickler(buf, protocol=2).dump(payload)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.array.astype(s.array.dtype.newbyteorder("<"))
                        .tobytes())
        zf.writestr("archive/version", "3\n")


def test_convert_cli_roundtrip(tmp_path, monkeypatch, model_and_weights, capsys):
    model, sd, _ = model_and_weights
    src, dst = tmp_path / inception.FID_INCEPTION_FILENAME, tmp_path / "out" / "fid.npz"
    _write_torch_zip(src, sd, monkeypatch)
    assert inception.main(["convert", f"--src={src}", f"--dst={dst}", "--no-torch"]) == 0
    assert "wrote 566 arrays" in capsys.readouterr().out
    with np.load(dst) as f:
        assert sorted(f.files) == sorted(sd)
        for key in ("Mixed_6e.branch7x7dbl_5.conv.weight", "fc.weight",
                    "Conv2d_1a_3x3.bn.num_batches_tracked"):
            np.testing.assert_array_equal(f[key], sd[key])
    # The original .pth loads directly too.
    direct = nnx.eval_shape(lambda: inception.FIDInceptionV3())
    loaded = torch_pickle.read_torch_state_dict(str(src), use_torch=False)
    inception.load_state_dict_into(direct, loaded)
    np.testing.assert_array_equal(direct.Mixed_7b.branch3x3_2a.conv.kernel.get_value(),
                                  model.Mixed_7b.branch3x3_2a.conv.kernel.get_value())


def test_missing_and_mismatched_weights(tmp_path, model_and_weights, capsys):
    _, sd, _ = model_and_weights
    model = nnx.eval_shape(lambda: inception.FIDInceptionV3())
    with pytest.raises(FileNotFoundError, match="convert"):
        inception.load_fid_inception_weights(model, str(tmp_path / "nope.npz"))
    with pytest.raises(FileNotFoundError):
        inception.compute_fid(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)),
                              str(tmp_path / "nope.npz"))
    assert inception.main(["convert", f"--src={tmp_path / 'nope.pth'}",
                           f"--dst={tmp_path / 'x.npz'}"]) == 2
    assert not (tmp_path / "x.npz").exists()
    assert "fixed_slots.eval.inception convert" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no torch checkpoint at"):
        torch_pickle.read_torch_state_dict(str(tmp_path / "nope.pth"), use_torch=False)
    broken = dict(sd)
    del broken["Mixed_5b.branch1x1.conv.weight"]
    broken["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
    with pytest.raises(ValueError, match="1 missing.*1 unexpected"):
        inception.load_state_dict_into(model, broken)
    wrong = dict(sd)
    wrong["Mixed_5b.branch1x1.bn.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="expected shape"):
        inception.load_state_dict_into(model, wrong)


def test_compute_fid_plumbing(model_and_weights, monkeypatch):
    model, _, path = model_and_weights
    small = nnx.clone(model)
    small.resize_input = False
    rng = np.random.default_rng(0)
    real = (rng.random((3, 75, 75, 3)) * 255).astype(np.uint8)
    fake = rng.random((3, 75, 75, 3)).astype(np.float32)
    # Padded last batch (3 = 2 + 1) gives the same features as one batch of 3.
    acts = inception.inception_activations(small, real, batch_size=2)
    assert acts.shape == (3, 2048) and acts.dtype == np.float64
    np.testing.assert_allclose(acts, inception.inception_activations(small, real, batch_size=3),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        acts[:1], inception.inception_activations(small, real[:1].astype(np.float32) / 255.0, 1),
        rtol=1e-5, atol=1e-6)
    # The 2048x2048 matrix square root takes ~1 min on a small CPU: check what reaches it instead
    # (frechet_distance itself is tested against an independent reference in test_metrics.py).
    seen = {}

    def fake_frechet(mu1, sigma1, mu2, sigma2):
        seen.update(mu1=mu1, sigma1=sigma1, mu2=mu2, sigma2=sigma2)
        return 12.5

    monkeypatch.setattr(metrics, "frechet_distance", fake_frechet)
    assert inception.compute_fid(real, fake, path, batch_size=2, model=small) == 12.5
    mu1, sigma1 = metrics.activation_statistics(acts)
    mu2, _ = metrics.activation_statistics(inception.inception_activations(small, fake, 3))
    np.testing.assert_allclose(seen["mu1"], mu1, rtol=1e-6)
    np.testing.assert_allclose(seen["sigma1"], sigma1, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(seen["mu2"], mu2, rtol=1e-5, atol=1e-6)


# --- crafted files: views outside their storage, code in the pickle ------------------------------

def _readers():
    """The built-in reader always; torch's too where it is installed (both must refuse)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return [False]
    return [False, True]


_SIX = {"w": np.arange(6, dtype=np.float32)}  # one storage of 6 float32 elements


@pytest.mark.parametrize("use_torch", _readers(), ids=lambda t: "torch" if t else "builtin")
@pytest.mark.parametrize("view, message", [
    ((0, (4, 4), (4, 1)), r"reaches element 15 of a storage of 6 elements"),
    ((5, (2,), (1,)), r"reaches element 6 of a storage of 6"),
    ((0, (2,), (10**12,)), r"reaches element 1000000000000 of a storage of 6"),
    ((2, (3,), (-1,)), r"negative values are refused"),
    ((-1, (2,), (1,)), r"negative values are refused"),
    ((0, (10**6, 10**6), (0, 0)), r"more than 2147483648 elements"),
    ((0, (2, 3), (3,)), r"2 sizes \(2, 3\) but 1 strides"),
], ids=["2d-past-end", "offset-past-end", "huge-stride", "negative-stride", "negative-offset",
        "stride-0-without-bound", "sizes-strides-mismatch"])
def test_views_outside_their_storage_are_refused(tmp_path, monkeypatch, view, message,
                                                 use_torch):
    path = tmp_path / "crafted.pth"
    _write_torch_zip(path, _SIX, monkeypatch, views={"w": view})
    with pytest.raises(torch_pickle.TorchCheckpointError) as info:
        torch_pickle.read_torch_state_dict(str(path), use_torch=use_torch)
    assert str(path) in str(info.value)
    if not use_torch:  # torch words its own refusals
        assert re.search(message, str(info.value)), str(info.value)
        assert "tensor w:" in str(info.value)


def test_views_inside_their_storage_still_read(tmp_path, monkeypatch):
    flat = np.arange(6, dtype=np.float32)
    views = {"t": (0, (3, 2), (1, 3)), "o": (4, (2,), (1,)), "e": (1, (2, 3), (0, 1)),
             "z": (6, (0, 4), (4, 1)), "s": (5, (), ())}
    path = tmp_path / "views.pth"
    _write_torch_zip(path, {k: flat for k in views}, monkeypatch, views=views)
    sd = torch_pickle.read_torch_state_dict(str(path), use_torch=False)
    np.testing.assert_array_equal(sd["t"], flat.reshape(2, 3).T)  # a transposed view
    np.testing.assert_array_equal(sd["o"], [4.0, 5.0])  # offset to the last element
    np.testing.assert_array_equal(sd["e"], np.broadcast_to(flat[1:4], (2, 3)))  # expanded
    assert sd["z"].shape == (0, 4)  # empty views touch no element
    assert sd["s"].shape == () and sd["s"] == 5.0


def _legacy_file(path, numel, view):
    """A legacy (pre-zip) torch.save file of one tensor over a view of a storage of `numel`
    floats: the storage view is (offset, size) as the legacy format records it."""
    fake_torch = types.ModuleType("torch")
    fake_torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    fake_utils = types.ModuleType("torch._utils")

    def _rebuild_tensor(*args):
        raise AssertionError("only pickled here")

    _rebuild_tensor.__module__, _rebuild_tensor.__qualname__ = "torch._utils", "_rebuild_tensor"
    fake_utils._rebuild_tensor = _rebuild_tensor

    class Storage:
        pass

    class Tensor:
        def __reduce_ex__(self, protocol):
            return (_rebuild_tensor, (storage, 0, (view[1],), (1,)))

    storage = Storage()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if obj is storage:
                return ("storage", fake_torch.FloatStorage, "0", "cpu", numel,
                        ("0v", view[0], view[1]))
            return None

    buf = io.BytesIO()
    for header in (torch_pickle._LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    saved = dict(sys.modules)
    try:
        sys.modules.update({"torch": fake_torch, "torch._utils": fake_utils})
        Pickler(buf, protocol=2).dump({"w": Tensor()})
    finally:
        sys.modules.clear()
        sys.modules.update(saved)
    pickle.dump(["0"], buf, protocol=2)
    buf.write(np.int64(numel).tobytes() + np.arange(numel, dtype="<f4").tobytes())
    path.write_bytes(buf.getvalue())


def test_legacy_storage_views_are_checked_against_their_storage(tmp_path):
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    _legacy_file(good, numel=6, view=(2, 3))
    np.testing.assert_array_equal(
        torch_pickle.read_torch_state_dict(str(good), use_torch=False)["w"], [2.0, 3.0, 4.0])
    _legacy_file(bad, numel=6, view=(4, 5))
    with pytest.raises(torch_pickle.TorchCheckpointError,
                       match=r"elements \[4, 9\) lies outside its storage of 6 elements"):
        torch_pickle.read_torch_state_dict(str(bad), use_torch=False)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_code_in_the_pickle_is_refused(tmp_path):
    marker = tmp_path / "exploited"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": _Exploit(str(marker))}, protocol=2))
    with pytest.raises(torch_pickle.TorchCheckpointError, match="unsupported global.*mkdir"):
        torch_pickle.read_torch_state_dict(str(path), use_torch=False)
    assert not marker.exists()


def test_convert_checks_its_input_before_writing(tmp_path, monkeypatch, model_and_weights,
                                                 capsys):
    _, sd, _ = model_and_weights
    dst = tmp_path / "fid.npz"
    crafted = tmp_path / "crafted.pth"
    _write_torch_zip(crafted, _SIX, monkeypatch, views={"w": (0, (4, 4), (4, 1))})
    other = tmp_path / "other.pth"  # readable, but not the FID Inception weights
    _write_torch_zip(other, {"fc.weight": np.zeros((3, 2), np.float32)}, monkeypatch)
    for src in (crafted, other):
        capsys.readouterr()
        assert inception.main(["convert", f"--src={src}", f"--dst={dst}", "--no-torch"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {src}"), err
        assert not dst.exists() and not list(tmp_path.glob(".fid.npz*"))
    # A good conversion replaces an old file only once it is complete; a bad one leaves it.
    dst.write_bytes(b"old")
    assert inception.main(["convert", f"--src={other}", f"--dst={dst}", "--no-torch"]) == 2
    assert dst.read_bytes() == b"old"
    good = tmp_path / inception.FID_INCEPTION_FILENAME
    _write_torch_zip(good, sd, monkeypatch)
    assert inception.main(["convert", f"--src={good}", f"--dst={dst}", "--no-torch"]) == 0
    with np.load(dst) as f:
        assert sorted(f.files) == sorted(sd)
