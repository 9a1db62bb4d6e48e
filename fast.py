"""
Speed tricks that are not the model (model.py stays the model, as in gpt-fast), each with the
reason it exists:

  generate, prefill,   generation over the static KV cache: one prefill, then one-token steps whose
  DecodeStep           shapes never change (each attends over every cache slot with a mask), so on
                       CUDA the step is captured once as a CUDA graph and replayed. Decoding is
                       launch-bound otherwise: issue 13 counted ~1,800 kernel launches per step.
  attention_backends   the SDPA backends for generation, chosen on purpose, not by the dispatcher
  compile_blocks       regional compilation: each Block compiled on its own, one graph for all
  compile_setting      the --compile setting of train.py, eval.py and bench.py ("" = on for CUDA)
"""
import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cli import BOOLS, ConfigError


def attention_backends(device):
    """On CUDA every SDPA backend but cuDNN: cuDNN builds a plan for each new shape (~1.7 ms of CPU
    a call, half of a batch-1 decode step in issue 13's profile). Our cache masks are boolean or
    float, which memory-efficient attention takes. Elsewhere the dispatcher's choice."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def generate(model, idx, max_new_tokens, cuda_graph=True, **options):
    """model.generate (same options) with the attention backends chosen on purpose and, on CUDA, the
    one-token step replayed as a CUDA graph (cuda_graph=False: eager steps)."""
    with attention_backends(idx.device):
        return model.generate(idx, max_new_tokens, **options,
                              decode_step=lambda m, cache: DecodeStep(m, cache, cuda_graph))


def prefill(model, cache, idx, attention_mask=None):
    """The prompt idx (B, T) (left-padded rows need attention_mask) into an empty cache -> logits
    (B, 1, V) of the last position."""
    with attention_backends(idx.device):
        return model(idx, attention_mask=attention_mask, cache=cache, last_only=True)[0]


class DecodeStep:
    """step(idx (B, 1)) -> logits (B, 1, V): one new token per row of a filled KVCache. Every step
    has the same shapes, so on CUDA (cuda_graph=True) the first WARMUP steps run eagerly on a side
    stream (lazy initialisation, compiled blocks' first calls), the next one is captured as a CUDA
    graph, and every later step is one replay: the Python of ~1,800 kernel launches runs once.
    A replay's logits live in the graph's output buffer: read them before the next step. On the
    CPU it is the plain eager step."""

    WARMUP = 2

    def __init__(self, model, cache, cuda_graph=True):
        self.model, self.cache = model, cache
        self.device = cache.valid.device
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.graph, self.steps = None, 0

    def eager(self, idx):
        with attention_backends(self.device):
            return self.model(idx, cache=self.cache, last_only=True)[0]

    def __call__(self, idx):
        self.steps += 1
        if not self.use_graph:
            return self.eager(idx)
        if self.graph is None and self.steps <= self.WARMUP:
            return self.on_side_stream(idx)
        if self.graph is None:
            self.capture(idx)
        self.cache.check(1)
        self.idx.copy_(idx)
        self.graph.replay()
        self.cache.pos += 1  # the graph advanced the cache on the device; Python's count follows
        return self.logits

    def on_side_stream(self, idx):  # warm-up before a capture belongs off the default stream
        stream, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            logits = self.eager(idx)
        main.wait_stream(stream)
        return logits

    def capture(self, idx):
        self.idx, self.graph = idx.clone(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.eager(self.idx)
        self.cache.pos -= 1  # capturing recorded the step without running it; the replay runs it


def compile_blocks(model, **options):
    """Regional compilation: torch.compile each Block on its own. The blocks share their code and
    shapes and carry no layer index (each is handed its own LayerCache), so one compiled graph
    serves every layer and compile time does not grow with depth (issue 13: the whole 7B model did
    not compile in 120 s; by block, 24 s). Returns the model."""
    for block in model.layers:
        block.compile(**options)
    return model


def compile_setting(value, device):
    """--compile: "" = auto, on for CUDA and off elsewhere (inductor compiles slowly on a CPU, for
    a small gain); true/false (yes/no, 1/0) force it. -> bool."""
    if value == "":
        return torch.device(device).type == "cuda"
    if value.lower() not in BOOLS:
        raise ConfigError(f"--compile={value}: expected true or false, or nothing for auto "
                          "(on for CUDA)")
    return BOOLS[value.lower()]
