"""The one prompt template shared by train.py and eval.py.

LLM-Adapters trains (finetune.py) and evaluates (evaluate.py) with Alpaca
templates whose whitespace differs (the eval copy is indented inside a
triple-quoted f-string), so the model is tested on prompts it never saw.
Here there is exactly one template, used by both sides:

- train.py: ``prompt, response = format_example(row)``; tokenize
  ``prompt + response`` (+ EOS) and, when ``train_on_inputs=False``, mask
  the loss on the prompt tokens.
- eval.py: generate from ``format_prompt(row["instruction"], row.get("input", ""))``
  and score ``response_of(continuation)`` with ``data.scoring``.

The prompt ends with "### Response:\\n", so the response starts right after it.
"""

TEMPLATE_NAME = "alpaca"
RESPONSE = "### Response:"  # the header after which the response starts

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt up to and including "### Response:\\n".

    An empty (or None) input selects the no-input variant, as in Alpaca.
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def format_example(row: dict) -> tuple[str, str]:
    """A data row -> (prompt, response); response is row["output"] verbatim (no EOS)."""
    return format_prompt(row["instruction"], row.get("input") or ""), row["output"]


# the template's name in an adapter's extra settings (train.py writes it) -> its prompt function
TEMPLATES = {TEMPLATE_NAME: format_prompt}


def response_of(text: str) -> str:
    """The response in a generated continuation: the text before any further "### Response:" (a
    model that goes on to write another example), stripped. LLM-Adapters scores
    ``output.split("### Response:")[1]`` of prompt + continuation: the same text."""
    return text.split(RESPONSE)[0].strip()
