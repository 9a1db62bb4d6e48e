"""presets.py: Config refuses wrong values by name, and every preset is the published model (exact
parameter counts, built on the meta device; the tiny ones build and run). The presets against the
published config.json files are in test_checkpoints.py. All offline, CPU."""
from dataclasses import replace

import pytest
import torch

from model import Transformer
from presets import PRESETS, Config, RopeScaling


def rand_ids(*shape, vocab=256, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ours(m, idx, **kw):
    return m(idx, **kw)[0]


# --------------------------------------------------------------------------------------------------
# 1. Config


def test_error_config_values():
    with pytest.raises(ValueError, match="unknown model preset 'llama-8b'"):
        Config.from_name("llama-8b")
    with pytest.raises(ValueError, match="not a multiple of n_kv_head"):
        Config(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="Config.norm='batchnorm'"):
        Config(norm="batchnorm")
    with pytest.raises(ValueError, match="0 < low_freq_factor < high_freq_factor"):
        RopeScaling(low_freq_factor=4.0)  # the blended band would divide by zero


# --------------------------------------------------------------------------------------------------
# 2. Presets


PRESET_PARAMS = {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320,
                 "llama-30b": 32_528_943_616,
                 "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320,
                 "llama-2-70b": 68_976_648_192,
                 "gptj-6b": 6_050_882_784, "bloom-7b1": 7_069_016_064, "opt-6.7b": 6_658_473_984,
                 # published counts; test_checkpoints.py also builds transformers' own models
                 "llama-3-8b": 8_030_261_248, "llama-3.1-8b": 8_030_261_248,
                 "llama-3.1-70b": 70_553_706_496, "llama-3.2-1b": 1_235_814_400,
                 "llama-3.2-3b": 3_212_749_824, "qwen2.5-0.5b": 494_032_768,
                 "qwen2.5-7b": 7_615_616_512, "mistral-7b": 7_241_732_096}


def n_params(config):
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(config).parameters())  # tied weights counted once


def test_preset_parameter_counts_full_build():
    assert n_params(Config.from_name("llama-7b")) == PRESET_PARAMS["llama-7b"]


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_preset_parameter_counts(name):
    """Layers are identical, so the count is P(1 layer) + (n_layer - 1) * (P(2) - P(1)): cheap on
    meta (the full build of every preset costs seconds of module construction); llama-7b is also
    built in full above."""
    c = Config.from_name(name)
    p1, p2 = n_params(replace(c, n_layer=1)), n_params(replace(c, n_layer=2))
    assert p1 + (c.n_layer - 1) * (p2 - p1) == PRESET_PARAMS[name]


def test_tiny_presets_build_and_run():
    for name, c in PRESETS.items():
        if name.startswith("tiny"):
            m = Transformer(c)
            assert ours(m, rand_ids(1, 4, vocab=c.vocab_size)).shape == (1, 4, c.vocab_size)
