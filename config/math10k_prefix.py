# LLaMA-7B + prefix tuning on math_10k: LLM-Adapters' run (README, math_running_commands).
#   python train.py config/math10k_prefix.py --model=<llama-7b folder>
# Reported (LLM-Adapters README, LLaMA-7B-Prefix): GSM8K 24.4, AQuA 14.2, MAWPS 63.4, SVAMP 38.1,
# average 35.0.
model = "llama-7b-hf"     # yahma/llama-7b-hf, the paper's base: your folder with --model=<dir>
data = "data/out/train/math_10k.json"
out = "out/llama-7b-math10k-prefix"
adapter = "prefix"
num_virtual_tokens = 10   # the paper's best; keys and values of every layer, no reparameterisation
learning_rate = 3e-2      # a hundred times LoRA's: 2,621,440 parameters (0.04%) that start far
                          # from anything the base has seen
warmup_steps = 100
# tokens per step: 8 examples (2 micro-batches of 4, accumulated) x at most 256 tokens = at most
# 2,048. math_10k has about 10,000 rows, so an epoch is ~1,240 steps and the run ~6,200.
batch_size = 8
micro_batch_size = 4
cutoff_len = 256
num_epochs = 5
val_set_size = 120        # the best of the validations every 10 steps is kept
eval_interval = 10        # their eval_step and save_step
group_by_length = False   # their default
