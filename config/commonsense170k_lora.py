# LLaMA-7B + LoRA on commonsense_170k (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c and
# OBQA training sets in one file).
#   python train.py config/commonsense170k_lora.py --model=<llama-7b folder>
# Reported (LLM-Adapters README, LLaMA-7B-LoRA): BoolQ 68.9, PIQA 80.7, SIQA 77.4, HellaSwag 78.1,
# WinoGrande 78.8, ARC-e 77.8, ARC-c 61.3, OBQA 74.8, average 74.7 (series 70.8, parallel 72.3,
# prefix 64.6). Their README gives no command for this run: these are the math run's settings, with
# the validation of their series run, as the later papers that rerun it use.
model = "llama-7b-hf"     # yahma/llama-7b-hf, the paper's base: your folder with --model=<dir>
data = "data/out/train/commonsense_170k.json"
out = "out/llama-7b-commonsense170k-lora"
adapter = "lora"          # 56,098,816 trainable parameters (0.83% of the 6.79B)
r = 32
alpha = 64
dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
learning_rate = 3e-4
# train.py's defaults are LLM-Adapters' recipe: batch 16 (4 micro-batches of 4, accumulated),
# cutoff 256 tokens, 3 epochs, 100 warmup steps then linear decay, AdamW.
# tokens per step: 16 examples (4 micro-batches of 4, accumulated) x at most 256 tokens = at most
# 4,096. About 170,000 rows: an epoch is ~10,600 steps and the run ~32,000.
val_set_size = 120
eval_interval = 80
group_by_length = False
