"""Weight updates from Python: tensors by name in, tensors by name out.

A trainer's shards (numpy arrays, one per parameter) are pushed into an
inference engine's own arrays: one receiver in place, one double buffered,
and fp8 receivers of bf16 sources checked against an independent numpy
quantizer.
"""

import numpy as np
import pytest

import transfer_engine as te


def tensors_for(layout, rank, fill=None):
    """One array per parameter shard `rank` holds, shaped as its shard."""
    out = {}
    for name, (dtype, shape) in layout.shards(rank).items():
        np_dtype = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32, "fp8": np.uint8, "int8": np.int8}[dtype]
        a = np.zeros(shape, dtype=np_dtype)
        if fill is not None:
            a[...] = fill(name, a.shape, np_dtype)
        out[name] = a
    return out


def full_tensor(name, shape, version):
    """The trainer's full bf16 tensor (as uint16 bits) of version `version`: finite values of mixed scale."""
    rng = np.random.default_rng(abs(hash((name, version))) % (1 << 32))
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(2.0) ** rng.integers(-8, 8)
    return (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation: any bf16 bits will do


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def e4m3_values():
    """All 256 e4m3fn codes decoded (NaN for 0x7f / 0xff)."""
    v = np.zeros(256, dtype=np.float64)
    for c in range(256):
        s, e, m = c >> 7, (c >> 3) & 15, c & 7
        if e == 15 and m == 7:
            v[c] = np.nan
        elif e == 0:
            v[c] = (m / 8) * 2.0**-6
        else:
            v[c] = (1 + m / 8) * 2.0 ** (e - 7)
        if s:
            v[c] = -v[c]
    return v


def quantize_reference(bits):
    """fp8 e4m3 codes and fp32 scales of a bf16 matrix (last two dims), 128x128 blocks, written independently
    of the C++ quantizer: nearest code, ties to the even code, saturating at 448."""
    x = bf16_to_f32(bits)
    rows, cols = x.shape[-2:]
    br, bc = -(-rows // 128), -(-cols // 128)
    values = e4m3_values()
    finite = np.where(np.isnan(values), np.inf, values)
    codes = np.zeros(x.shape, dtype=np.uint8)
    scales = np.zeros(x.shape[:-2] + (br, bc), dtype=np.float32)
    for idx in np.ndindex(*x.shape[:-2]):
        for i in range(br):
            for j in range(bc):
                blk = x[idx + (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))]
                amax = np.float32(np.max(np.abs(blk)))
                s = np.float32(1.0) if amax == 0 else max(amax / np.float32(448.0), np.float32(2.0**-126))
                scales[idx + (i, j)] = s
                q = (blk / s).astype(np.float32).astype(np.float64)
                q = np.clip(q, -448.0, 448.0)
                d = np.abs(q[..., None] - finite[None, None, :])
                best = np.min(d, axis=-1, keepdims=True)
                cand = d == best
                # same sign only (keeps -0 vs 0 apart), then the even code
                sign_ok = (np.arange(256)[None, None, :] >> 7) == (np.signbit(q)[..., None]).astype(int)
                cand &= sign_ok
                even = cand & ((np.arange(256)[None, None, :] & 1) == 0)
                pick = np.where(even.any(-1), np.argmax(even, -1), np.argmax(cand, -1))
                codes[idx + (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))] = pick
    return codes, scales


def shard_of(layout, name, rank, full):
    """`rank`'s shard of a full tensor, by comparing shapes (the split dimension is the one that shrinks)."""
    shape = layout.shard_shape(name, rank)
    if list(shape) == list(full.shape):
        return full
    dim = [i for i in range(full.ndim) if shape[i] != full.shape[i]][0]
    parts = full.shape[dim] // shape[dim] if full.shape[dim] % shape[dim] == 0 else None
    assert parts, "test models split evenly"
    part = rank % parts
    sl = [slice(None)] * full.ndim
    sl[dim] = slice(part * shape[dim], (part + 1) * shape[dim])
    return full[tuple(sl)]


MODEL = te.WeightModel(
    [
        ("embed", "bf16", [256, 64]),
        ("layer.q", "bf16", [256, 200]),
        ("layer.norm", "fp32", [200]),
        ("layer.experts.up", "bf16", [2, 256, 130]),
    ]
)


@pytest.mark.parametrize("fp8,provider", [(False, "tcp"), (True, "tcp"), (True, "local")])
def test_tensors_by_name_in_place_and_double_buffered(fp8, provider):
    dst_model = MODEL.fp8(["layer.q", "layer.experts.up"]) if fp8 else MODEL
    src = te.WeightLayout(MODEL, 2, "fsdp")
    dst = te.WeightLayout(dst_model, 2, "tp")
    fulls = {}

    def trainer_fill(version):
        for name, _, shape in MODEL.params:
            if name == "layer.norm":
                fulls[name] = np.arange(200, dtype=np.float32) * version
            else:
                fulls[name] = full_tensor(name, shape, version)

    with te.Engine(provider=provider) as e0, te.Engine(provider=provider) as e1, \
            te.Engine(provider=provider) as s0, te.Engine(provider=provider) as s1:
        in_place = tensors_for(dst, 0)
        doubled = [tensors_for(dst, 1), tensors_for(dst, 1)]
        rx0 = te.WeightReceiver(e0, dst, 0, 2, in_place, timeout=20.0)
        rx1 = te.WeightReceiver(e1, dst, 1, 2, doubled, timeout=20.0)
        trainer_fill(1)
        shards = [{n: np.ascontiguousarray(shard_of(src, n, r, fulls[n])).copy() for n in src.shards(r)} for r in (0, 1)]
        pushers = [te.WeightPusher(e, src, dst, r, shards[r], ready_timeout=10.0) for r, e in ((0, s0), (1, s1))]
        for p in pushers:
            p.set_receiver(0, rx0.info())
            p.set_receiver(1, rx1.info())
        for version in (1, 2, 3):
            if version > 1:
                trainer_fill(version)
                for r in (0, 1):
                    for n, a in shards[r].items():
                        a[...] = shard_of(src, n, r, fulls[n])  # in place: the trainer's tensors are registered
            import threading

            reports = [None, None]

            def run(i):
                reports[i] = pushers[i].push(version)

            threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
            [t.start() for t in threads]
            [t.join(60) for t in threads]
            for rep in reports:
                assert rep is not None and rep["missed"] == {}, rep
                assert (rep["quantize_seconds"] > 0) == fp8
            assert rx0.wait(version, timeout=30.0) and rx1.wait(version, timeout=30.0)
            for rank, got in ((0, in_place), (1, doubled[version % 2])):
                for name, a in got.items():
                    base = name[: -len(".scale")] if name.endswith(".scale") else name
                    if fp8 and base in ("layer.q", "layer.experts.up"):
                        codes, scales = quantize_reference(fulls[base])
                        want = scales if name.endswith(".scale") else codes
                    else:
                        want = fulls[name]
                    np.testing.assert_array_equal(a.view(want.dtype), shard_of(dst, name, rank, want), err_msg=name)
        assert rx1.published == 3 and rx0.begun == 3
        for p in pushers:
            p.close()
        rx0.close()
        rx1.close()


def test_tensors_that_do_not_match_are_refused_by_name():
    dst = te.WeightLayout(MODEL, 2, "tp")
    with te.Engine(provider="tcp") as e:
        t = tensors_for(dst, 0)
        t["layer.q"] = np.zeros((10, 10), dtype=np.uint16)
        with pytest.raises(te.TransferError, match="tensor 'layer.q' holds 200 bytes"):
            te.WeightReceiver(e, dst, 0, 1, t)
        t = tensors_for(dst, 0)
        t["layer.q"] = t["layer.q"].reshape(-1, 128)  # right bytes, wrong shape
        with pytest.raises(te.TransferError, match="has shape"):
            te.WeightReceiver(e, dst, 0, 1, t)
        t = tensors_for(dst, 0)
        del t["embed"]
        with pytest.raises(te.TransferError, match="holds 'embed'"):
            te.WeightReceiver(e, dst, 0, 1, t)
        with pytest.raises(te.TransferError, match="sets of tensors"):
            te.WeightReceiver(e, dst, 0, 1, [tensors_for(dst, 0)] * 3)
        with pytest.raises(te.TransferError, match="straddles|inside a 128 x 128 block"):
            src = te.WeightLayout(MODEL, 3, "fsdp")  # rows of layer.q split at 85
            te.WeightPusher(e, src, te.WeightLayout(MODEL.fp8(), 1, "replicated"), 0,
                            tensors_for(src, 0))
