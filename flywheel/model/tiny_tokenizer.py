"""The tiny preset's tokenizer: a byte-level BPE with Qwen2.5's special tokens and chat template.

The files live in `flywheel/model/tiny_tokenizer/` so the tiny preset needs no network. This module
rebuilds them deterministically: `python -m flywheel.model.tiny_tokenizer`.
"""

from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "tiny_tokenizer"

# Qwen2.5-VL's special tokens, so the chat template and padding behave as with the real tokenizer.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]

# Qwen2.5-VL's template, reduced to text content (the pipeline sends system + user text only).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are a helpful assistant who will provide prompts to an image generator.",
    "The robot arm is performing a task. Push the T-shaped block onto the green target area.",
    "The robot arm is performing a task. Pick up the yellow bottle on the table.",
    "A humanoid robot with dexterous hands grasps an object, lifts it and places it down.",
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, "
    "jerky movements, low frame rate, artifacting, color banding, unnatural transitions, flickering.",
    "left right up down red blue green yellow gray camera top view side view gripper agent block table",
]


def build(out_dir: Path = TOKENIZER_DIR) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build())
