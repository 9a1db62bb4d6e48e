# LLaMA-7B + a parallel adapter on math_10k: LLM-Adapters' run (README, math_running_commands).
#   python train.py config/math10k_parallel.py --model=<llama-7b folder>
# Reported (LLM-Adapters README, LLaMA-7B-Parallel): GSM8K 35.3, AQuA 18.1, MAWPS 82.4,
# SVAMP 49.6, average 46.4.
model = "llama-7b-hf"     # yahma/llama-7b-hf, the paper's base: your folder with --model=<dir>
data = "data/out/train/math_10k.json"
out = "out/llama-7b-math10k-parallel"
adapter = "parallel"      # 247,463,936 trainable parameters (3.54%)
bottleneck = 256          # the paper's best bottleneck size (their bottleneck_size default),
                          # tanh between down and up: the kind's default and theirs
per_linear = ["up_proj", "down_proj"]  # their command: a bottleneck beside each of these linears
learning_rate = 3e-4
# train.py's defaults are LLM-Adapters' recipe: batch 16 (4 micro-batches of 4, accumulated),
# cutoff 256 tokens, 3 epochs, 100 warmup steps then linear decay, AdamW.
# tokens per step: 16 examples (4 micro-batches of 4, accumulated) x at most 256 tokens = at most
# 4,096. math_10k has about 10,000 rows, so an epoch is ~620 steps and the run ~1,850.
val_set_size = 0          # their parallel command validates nothing: the last adapter is kept
eval_interval = 80
group_by_length = False   # their default
