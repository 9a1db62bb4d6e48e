# LLaMA-7B + a series adapter on math_10k: LLM-Adapters' run (README, math_running_commands).
#   python train.py config/math10k_series.py --model=<llama-7b folder>
# Reported (LLM-Adapters README, LLaMA-7B-Series): GSM8K 33.3, AQuA 15.0, MAWPS 77.7, SVAMP 52.3,
# average 44.6.
model = "llama-7b-hf"     # yahma/llama-7b-hf, the paper's base: your folder with --model=<dir>
data = "data/out/train/math_10k.json"
out = "out/llama-7b-math10k-series"
adapter = "series"        # 67,108,864 trainable parameters (0.99%)
bottleneck = 256          # the paper's best bottleneck size (their bottleneck_size default),
                          # tanh between down and up: the kind's default and theirs
placement = "mlp"         # the paper's placement study: best after the MLP. Their released command
                          # puts it before gate_proj and up_proj instead, which the series kind
                          # here does not offer
learning_rate = 3e-4
# train.py's defaults are LLM-Adapters' recipe: batch 16 (4 micro-batches of 4, accumulated),
# cutoff 256 tokens, 3 epochs, 100 warmup steps then linear decay, AdamW.
# tokens per step: 16 examples (4 micro-batches of 4, accumulated) x at most 256 tokens = at most
# 4,096. math_10k has about 10,000 rows, so an epoch is ~620 steps and the run ~1,850.
val_set_size = 120        # the best of the validations every 80 steps is kept
eval_interval = 80
group_by_length = False   # their default
# Their command adds --load_8bit (bitsandbytes' LLM.int8, with fp16 outlier columns);
# --quantize=int8 here is another int8 (per-row absmax, no outliers), so it is left off.
