# LLaMA-7B + LoRA on math_10k: LLM-Adapters' run (its README and math_running_commands).
#   python data/prepare.py --from <LLM-Adapters checkout>   # -> data/out/train/math_10k.json
#   python train.py config/math10k_lora.py --model=<llama-7b folder>
# Reported (LLM-Adapters README, LLaMA-7B-LoRA): GSM8K 37.5, AQuA 18.9, MAWPS 79.0, SVAMP 52.1,
# average 46.9; series 44.6, parallel 46.4, prefix 35.0 (config/math10k_*.py).
model = "llama-7b-hf"     # yahma/llama-7b-hf, the paper's base: your folder with --model=<dir>
data = "data/out/train/math_10k.json"
out = "out/llama-7b-math10k-lora"
adapter = "lora"          # 56,098,816 trainable parameters (0.83% of the 6.79B)
r = 32                    # the paper's best rank, alpha = 2r
alpha = 64
dropout = 0.05            # LLM-Adapters' lora_dropout default
target_modules = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # attention and MLP
learning_rate = 3e-4
# train.py's defaults are LLM-Adapters' recipe: batch 16 (4 micro-batches of 4, accumulated),
# cutoff 256 tokens, 3 epochs, 100 warmup steps then linear decay, AdamW.
# tokens per step: 16 examples (4 micro-batches of 4, accumulated) x at most 256 tokens = at most
# 4,096. math_10k has about 10,000 rows, so an epoch is ~620 steps and the run ~1,850.
val_set_size = 0          # their LoRA command validates nothing: the last adapter is kept
eval_interval = 80        # their save_step: resume.pt (and the adapter) every 80 steps
group_by_length = False   # their default (true here: less padding, other batches)
# They train a float16 base (Trainer fp16=True); dtype "" takes bfloat16 where the GPU has it.
