"""The compiled denoising step writes only the chunk's slots of the KV cache, however long the queue.

The code inductor generates for `model.step` is read: the C++ kernels that store into a cache buffer must write
exactly the chunk's keys and values per step, at a short and a long queue, and no temporary may be as large as a
layer's buffer (a copy of it). The kernels are generated scalar (no SIMD), so the count is the same on every CPU.
"""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

CHUNK = 2
LATENT = 4  # 4x4 latents: S = 4 tokens per frame

KERNEL = re.compile(r"^(\w+) = async_compile\.cpp_pybinding\(.*?r'''(.*?)'''\)", re.S | re.M)
PARAMS = re.compile(r'extern "C"\s+void\s+kernel\((.*?)\)\s*\{', re.S)
# for(int64_t x0=(0L); x0<(16L); x0+=(8L)) once static_cast<int64_t> is dropped: variable, start, stop, step
FOR = re.compile(r"for\s*\(\s*\w+\s+(\w+)\s*=\s*\(?(\d+)L?\)?;\s*\1\s*<\s*\(?(\d+)L?\)?;"
                 r"\s*\1\s*(?:\+=\s*\(?(\d+)L?\)?|\+\+)\s*\)")
INPUT = re.compile(r"assert_size_stride\((arg\d+_1), \(([\d, ]+)\)")
TEMPORARY = re.compile(r"empty_strided_cpu\(\(([\d, ]+)\)")


def _shape(text: str) -> tuple[int, ...]:
    """'4, 2, 8, 16' -> (4, 2, 8, 16)."""
    return tuple(int(n) for n in text.split(",") if n.strip())


def _numel(shape: tuple[int, ...]) -> int:
    """Elements of a tensor of `shape`."""
    return torch.Size(shape).numel()


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments of a call."""
    args, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            args.append(text[start:i])
            start = i + 1
    return [a.strip() for a in args + [text[start:]] if a.strip()]


def _stored_elements(body: str, pointer: str) -> int:
    """Elements a scalar C++ kernel stores through `pointer` (or a local alias of it): per store statement, the
    product of the trip counts of the loops around it."""
    names = {pointer} | set(re.findall(rf"auto (\w+) = {pointer};", body))
    store = re.compile(rf"(?:\b(?:{'|'.join(names)})\[[^;]*\]\s*=(?!=))|(?:&(?:{'|'.join(names)})\[)")
    loops, pending, depth, total = [], None, 0, 0  # loops: (brace depth inside the loop, trips)
    for line in body.replace("static_cast<int64_t>", "").splitlines():
        match = FOR.search(line)
        if match:
            start, stop, step = int(match[2]), int(match[3]), int(match[4] or 1)
            pending = -(-(stop - start) // step)
        for char in line:
            if char == "{":
                depth += 1
                if pending is not None:
                    loops.append((depth, pending))
                    pending = None
            elif char == "}":
                while loops and loops[-1][0] >= depth:
                    loops.pop()
                depth -= 1
        if store.search(line):
            total += _numel(tuple(trips for _, trips in loops))
    return total


def cache_writes(code: str, buffer_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """From inductor's output code for one step: (the cache buffers among its inputs (those of `buffer_shape`), the
    elements its kernels and copies write into them, the largest temporary it allocates, in elements)."""
    assert "Vectorized" not in code, "the kernels must be generated scalar for the count to hold"
    kernels = {name: body for name, body in KERNEL.findall(code)}
    wrapper = code[code.index("def call(self, args)"):]
    buffers = {name for name, shape in INPUT.findall(wrapper) if _shape(shape) == buffer_shape}
    written = 0
    for line in wrapper.splitlines():
        call = re.match(r"\s*(\w+)\((.*)\)\s*$", line)
        if call and call[1] in kernels:
            body = kernels[call[1]]
            params = [p.split("*") for p in PARAMS.search(body)[1].split(",")]  # "const float* in_ptr0" -> type, name
            for arg, (kind, param) in zip(_split_args(call[2]), params):
                if "const" not in kind and set(re.findall(r"\barg\d+_1\b", arg)) & buffers:
                    written += _stored_elements(body, param.strip())
        elif "copy_" in line and set(re.findall(r"\barg\d+_1\b", line)) & buffers:
            written += _numel(buffer_shape)  # a whole-buffer copy done by the wrapper
    largest = max((_numel(_shape(shape)) for shape in TEMPORARY.findall(wrapper)), default=0)
    return len(buffers), written, largest


def compiled_step_code(model, cache) -> str:
    """Inductor's code for one denoising call of CHUNK frames through `cache` (one frame written first)."""
    with torch.inference_mode(), torch._inductor.config.patch({"cpp.simdlen": 1, "fx_graph_cache": False}):
        model.write_cache(torch.randn(1, 4, 1, LATENT, LATENT), cache)
        model.begin_call(cache, CHUNK, LATENT, LATENT)
        ctx = model.prepare(CHUNK, LATENT, LATENT, cache)
        step = torch.compile(model.step, fullgraph=True, dynamic=False)
        x, t = torch.randn(1, 4, CHUNK, LATENT, LATENT), torch.full((1, CHUNK), 500)
        _, code = run_and_get_code(step, x, t, ctx)
    torch._dynamo.reset()
    return "\n".join(code)


@pytest.mark.parametrize("capacity", [4, 36])
def test_compiled_step_writes_only_the_chunk(make_model, capacity):
    """Per step, the chunk's keys and values of every layer (2 x depth x B*S x H x T x Dh elements), whatever the
    queue's length; the old layout (one buffer for all layers) wrote every buffer whole, through copies of it."""
    model = make_model(depth=2, caption_channels=0)
    cache = model.new_cache(1, capacity, chunk_size=CHUNK)
    code = compiled_step_code(model, cache)
    rows, heads, _, head_dim = cache.k[0].shape
    found, written, largest = cache_writes(code, tuple(cache.k[0].shape))
    assert found == 2 * len(model.blocks)  # every layer's keys and values are inputs of the step
    assert written == 2 * len(model.blocks) * rows * heads * CHUNK * head_dim
    assert largest < cache.k[0].numel()
