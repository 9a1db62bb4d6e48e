"""
Generation, the one decode loop (as in gpt-fast's generate.py), over model.py's static KV cache:

  generate        a prompt batch (B, T), left-padded with an attention_mask, continued greedily or
                  sampled; each row stops on any of `stop_ids` (Llama 3 has three end tokens) and
                  is then padded with its stop token. callback(tokens) sees every step: streaming
  beam_search     batched beam search on the same cache (cache.repeat, cache.reorder)
  generate_ids    many prompts of token ids, batched longest first, left-padded: eval.py's
  generate_batch  ... fitted to the model's context, decoded, with the stop reason of each

Speed, each trick with its reason: one prefill, then one-token steps whose shapes never change
(each attends over every cache slot with a mask), so on CUDA `DecodeStep` captures the step once
as a CUDA graph and replays it (decoding is launch-bound otherwise: ~1,800 kernel launches per
step of a 7B model); `attention_backends` picks the SDPA kernels on purpose.

Shapes: B rows, T prompt tokens, V vocab, K beams per row.
"""
import contextlib
import math
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

STOP_TOKEN, MAX_NEW_TOKENS = "stop_token", "max_new_tokens"  # why a response ended


def cut_at_stop(ids, stop_ids):
    """The ids before the first stop id (all of them when there is none): what a generation loop
    keeps of a row. stop_ids: tok.stop_ids."""
    ids = [int(i) for i in ids]
    return next((ids[:n] for n, i in enumerate(ids) if i in stop_ids), ids)


def attention_backends(device):
    """On CUDA every SDPA backend but cuDNN: cuDNN builds a plan for each new shape (~1.7 ms of CPU
    a call, half of a batch-1 decode step when profiled). Our cache masks are boolean or float,
    which memory-efficient attention takes. Elsewhere the dispatcher's choice."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def sample(logits, temperature=0.0, top_k=None):
    """logits (B, V) -> next ids (B,): the argmax when temperature == 0, else drawn from the
    softmax of logits / temperature (over the top_k only, if given)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1)[:, 0]


def new_cache(model, batch_size, prompt_len, max_new_tokens):
    """A KV cache with a slot for every prompt token, new token and soft token (prompt tuning).
    Learned positions (OPT) end at block_size: a request that could pass the table is refused here,
    up front, since a CUDA-graph step replays without the forward's own check."""
    c, n_soft = model.config, model.n_soft_tokens()
    slots = prompt_len + max_new_tokens + n_soft  # soft tokens take positions too
    if c.pos == "learned" and slots > c.block_size:
        soft = f" + {n_soft} soft tokens" if n_soft else ""
        raise ValueError(f"{prompt_len} prompt + {max_new_tokens} new tokens{soft}, but {c.name} "
                         f"has learned positions for {c.block_size} (max_position_embeddings): "
                         "shorten the input or ask for fewer new tokens")
    return model.new_cache(batch_size, slots)


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


# --------------------------------------------------------------------------------------------------
# the decode loop

def decode(step, logits, max_new_tokens, temperature=0.0, top_k=None, stop_ids=(), callback=None):
    """The loop: from the prefill's logits (B, 1, V), up to max_new_tokens tokens (B, n), one
    `step` per token. A row that produced any of stop_ids repeats that token from then on; the
    loop ends when every row has stopped. callback(tokens (B,)) is called with each new column
    as soon as it is chosen (before the next step runs): streaming."""
    B = logits.size(0)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=logits.device)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    out = []
    for i in range(max_new_tokens):
        nxt = sample(logits[:, -1], temperature, top_k)  # (B,)
        if len(stops):
            if out:  # a row that stopped keeps its stop token: padding, and still a stop
                nxt = torch.where(done, out[-1], nxt)
            done = done | torch.isin(nxt, stops)
        out.append(nxt)
        if callback is not None:
            callback(nxt)
        if i == max_new_tokens - 1 or (len(stops) and done.all()):
            break
        logits = step(nxt[:, None])
    return torch.stack(out, 1) if out else logits.new_zeros(B, 0, dtype=torch.long)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, stop_ids=(),
             attention_mask=None, callback=None, cuda_graph=True):
    """Continue idx (B, T) by up to max_new_tokens -> (B, T + n): greedy when temperature == 0,
    else sampled (top_k optional). Left-padded batches need attention_mask. A row stops on any of
    stop_ids (a list or set of ids) and is padded with its stop token; n < max_new_tokens only
    when every row stopped. callback(tokens (B,)) streams each new column (see decode). On CUDA
    the one-token step is a replayed CUDA graph (cuda_graph=False: eager steps)."""
    B, T = idx.shape
    cache = new_cache(model, B, T, max_new_tokens)
    logits = prefill(model, cache, idx, attention_mask)
    step = DecodeStep(model, cache, cuda_graph)
    new = decode(step, logits, max_new_tokens, temperature, top_k, stop_ids, callback)
    return torch.cat((idx, new), dim=1)


# --------------------------------------------------------------------------------------------------
# beam search

@torch.no_grad()
def beam_search(model, idx, attention_mask, max_new_tokens, num_beams, stop_ids=(),
                length_penalty=1.0, return_scores=False):
    """Batched beam search with a KV cache, as Hugging Face's (early_stopping=False): every step
    keeps the num_beams best unfinished continuations; a continuation ending in a stop id among
    the num_beams best candidates becomes a hypothesis, scored sum(log p) / len ** length_penalty
    with len = generated tokens incl. the stop token (HF counts the prompt and its padding there,
    which makes results depend on the batch). An example is done once it has num_beams hypotheses
    and none of its live beams scores better now; at max_new_tokens the live beams become
    hypotheses too. idx (B, T) left-padded with attention_mask (B, T). Returns the best
    continuation of each row, a list of ids without the stop id (with return_scores: (score, ids)
    pairs)."""
    B, T = idx.shape
    K, stop_ids = num_beams, frozenset(stop_ids)
    cache = new_cache(model, B, T, max_new_tokens)
    logits = prefill(model, cache, idx, attention_mask)
    cache.repeat(K)  # K beams per example, rows b*K .. b*K+K-1
    step = DecodeStep(model, cache)
    logp = F.log_softmax(logits[:, -1].float(), dim=-1).repeat_interleave(K, 0)  # (B*K, V)
    scores = torch.full((B, K), -math.inf, device=idx.device)
    scores[:, 0] = 0.0  # at first all K beams of an example are the same: keep one
    seqs = [[] for _ in range(B * K)]
    hyps = [[] for _ in range(B)]  # (score, ids)
    done = [max_new_tokens == 0] * B
    for n in range(1, max_new_tokens + 1):  # n: generated tokens after this step
        live = next_beams(scores, logp, seqs, hyps, done, stop_ids, n ** length_penalty)
        if n == max_new_tokens or all(done):
            break
        cache.reorder(torch.tensor([row for _, row, _ in live], device=idx.device))
        seqs = [seqs[row] + [t] for _, row, t in live]
        scores = torch.tensor([s for s, _, _ in live], device=idx.device).view(B, K)
        logits = step(torch.tensor([[t] for _, _, t in live], device=idx.device))
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)
    for b in range(B):  # at the end the live beams of unfinished examples are hypotheses too
        if not done[b]:
            hyps[b] += [(s / n ** length_penalty, seqs[row] + [t])
                        for s, row, t in live[b * K:(b + 1) * K] if s > -math.inf]
    best = [max(h, key=lambda x: x[0]) if h else (0.0, []) for h in hyps]
    return best if return_scores else [ids for _, ids in best]


def next_beams(scores, logp, seqs, hyps, done, stop_ids, norm):
    """One step of beam search: from the K beams of each example (scores (B, K), logp (B*K, V))
    the 2K best candidates; those ending in a stop id among the K best become hypotheses
    (score / norm) in hyps, the others the K new beams. Marks examples done (in `done`).
    -> [(score, source row, token)] for the B*K new beams; dead beams (done examples, too few
    candidates) score -inf."""
    B, K = scores.shape
    V = logp.size(-1)
    top, flat = (scores.view(-1, 1) + logp).view(B, K * V).topk(min(2 * K, K * V), dim=1)
    top, beam, tok = top.tolist(), (flat // V).tolist(), (flat % V).tolist()
    live = []
    for b in range(B):
        keep = []
        for rank in range(len(top[b]) if not done[b] else 0):
            s, row, t = top[b][rank], b * K + beam[b][rank], tok[b][rank]
            if s == -math.inf or len(keep) == K:
                break
            if t in stop_ids:
                if rank < K:
                    hyps[b].append((s / norm, seqs[row]))
            else:
                keep.append((s, row, t))
        keep += [(-math.inf, b * K, 0)] * (K - len(keep))
        if not done[b]:  # nothing left to explore, or no live beam beats the K best hypotheses
            worst = sorted(h[0] for h in hyps[b])[-K] if len(hyps[b]) >= K else -math.inf
            done[b] = keep[0][0] == -math.inf or worst >= keep[0][0] / norm
        live += keep
    return live


# --------------------------------------------------------------------------------------------------
# many prompts (eval.py)

def generate_ids(model, prompt_ids, max_new_tokens, batch_size=32, stop_ids=(), pad_id=0,
                 num_beams=1, length_penalty=1.0, progress=None):
    """Continuations of token-id prompts, each cut before its first stop id, in the order given:
    one of max_new_tokens ids hit the limit, a shorter one ended on a stop id. Batches are taken
    in order of prompt length, longest first, left-padded. progress(done, total) is called after
    each batch."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    device = model.embed.weight.device
    stop_ids = frozenset(stop_ids)
    out = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        batch = [prompt_ids[i] for i in order[start:start + batch_size]]
        T = max(map(len, batch))
        idx = torch.tensor([[pad_id] * (T - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch], device=device)
        if num_beams == 1:
            new = generate(model, idx, max_new_tokens, stop_ids=stop_ids, attention_mask=mask)
            new = new[:, T:].tolist()
        else:
            new = beam_search(model, idx, mask, max_new_tokens, num_beams, stop_ids,
                              length_penalty)
        for i, ids in zip(order[start:start + batch_size], new):
            out[i] = cut_at_stop(ids, stop_ids)
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return out


class Response(NamedTuple):
    text: str
    stop: str  # STOP_TOKEN (it ended) or MAX_NEW_TOKENS (cut by the limit)


def generate_batch(model, tok, prompt_ids, max_new_tokens, batch_size=32, num_beams=1,
                   length_penalty=1.0, progress=None):
    """Greedy (or beam) responses to prompts of token ids (a template's encode_prompt), in the
    order given: Response(text, stop), each ended by one of the tokenizer's stop ids or cut at
    max_new_tokens. A prompt that leaves no room for max_new_tokens within the model's block_size
    is cut from the left (a leading BOS kept), with a warning."""
    room = model.config.block_size - max_new_tokens - model.n_soft_tokens()
    if room < 1 + tok.add_bos:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"block_size {model.config.block_size}")
    cut = sum(len(x) > room for x in prompt_ids)
    if cut:
        print(f"warning: {cut} of {len(prompt_ids)} prompts are longer than {room} tokens "
              f"(block_size {model.config.block_size} - max_new_tokens {max_new_tokens}) "
              "and were cut from the left", file=sys.stderr)
        bos = [int(x[:1] == [tok.bos_id]) for x in prompt_ids]
        prompt_ids = [x if len(x) <= room else x[:b] + x[len(x) - room + b:]
                      for x, b in zip(prompt_ids, bos)]
    new = generate_ids(model, prompt_ids, max_new_tokens, batch_size, tok.stop_ids, tok.pad_id,
                       num_beams, length_penalty, progress)
    # a continuation cut before a stop id is shorter than the limit (see generate_ids)
    return [Response(tok.decode(x), MAX_NEW_TOKENS if len(x) == max_new_tokens else STOP_TOKEN)
            for x in new]
