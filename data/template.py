"""The prompt templates shared by train.py and eval.py, in one registry: TEMPLATES[name].

LLM-Adapters trains (finetune.py) and evaluates (evaluate.py) with Alpaca
templates whose whitespace differs (the eval copy is indented inside a
triple-quoted f-string), so the model is tested on prompts it never saw.
Here each template is written once, for both sides:

- training: ``ids, n_prompt = TEMPLATES[name].encode_example(tok, row)``: the
  example's ids (response and its end included) and how many of them are the
  prompt, whose loss is masked when ``train_on_inputs=False`` (with
  ``count_prompt=False`` n_prompt may be None: Alpaca then skips encoding the
  prompt a second time).
- evaluation: generate from ``TEMPLATES[name].encode_prompt(tok, instruction, input)``,
  stop at ``tok.stop_ids`` and score ``response_of(continuation)`` with ``data.scoring``.

Templates:
- "alpaca": plain text ending with "### Response:\\n"; the tokenizer's BOS
  and EOS around it. Also callable, ``TEMPLATES["alpaca"](instruction, input)``
  -> the prompt text, as format_prompt.
- "llama3-chat": Llama 3 Instruct's header format (llama_models' ChatFormat)::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{instruction}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{response}<|eot_id|>

  (one string, shown on two lines; an input follows the instruction after
  "\\n\\n"). Its special tokens are encoded by id, and each text piece on its own
  as ChatFormat does, so an instruction containing "<|eot_id|>" stays text. Its
  prompt is not plain text, so calling it raises TemplateError.
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


class TemplateError(ValueError):
    """A template used in a way it does not support (one line for the scripts)."""


class Special(str):
    """A special token inside a template's pieces: encoded by its id, never from text."""


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


def encode_pieces(tok, pieces) -> list[int]:
    """Pieces -> ids: a Special by its id, each text piece on its own and as plain text (the text
    of a special token in it is text)."""
    ids = []
    for piece in pieces:
        ids += [tok.special_id(piece)] if isinstance(piece, Special) else tok.encode(piece)
    return ids


class Alpaca:
    """LLM-Adapters' template: text only. Prompt and response are encoded as one text, then the
    prompt alone for its length, as LLM-Adapters' finetune.py does."""

    name = "alpaca"

    def text(self, instruction, input=""):
        return format_prompt(instruction, input or "")

    __call__ = text  # TEMPLATES["alpaca"](instruction, input) is format_prompt

    def encode_prompt(self, tok, instruction, input=""):
        return tok.encode(self.text(instruction, input), bos=tok.add_bos)

    def encode_example(self, tok, row, count_prompt=True):
        prompt, response = format_example(row)
        ids = tok.encode(prompt + response, bos=tok.add_bos, eos=True)
        # the prompt's length costs a second encoding: only when its loss is to be masked
        return ids, len(tok.encode(prompt, bos=tok.add_bos)) if count_prompt else None


class Llama3Chat:
    """Llama 3 Instruct's chat format, one user turn, pieces laid out as llama_models'
    ChatFormat.encode_dialog_prompt: the header's role and "\\n\\n" are separate pieces, and an
    input is the message's context ("\\n\\n" then the input). The response ends with <|eot_id|>,
    not the tokenizer's EOS."""

    name = "llama3-chat"
    BEGIN, EOT = Special("<|begin_of_text|>"), Special("<|eot_id|>")
    START, END = Special("<|start_header_id|>"), Special("<|end_header_id|>")

    def header(self, role):
        return [self.START, role, self.END, "\n\n"]

    def pieces(self, instruction, input=""):
        user = [instruction, "\n\n", input] if input else [instruction]
        return [self.BEGIN, *self.header("user"), *user, self.EOT, *self.header("assistant")]

    def text(self, instruction, input=""):
        """The prompt as text, special tokens spelled out: for reading, never for encoding."""
        return "".join(self.pieces(instruction, input))

    def __call__(self, instruction, input=""):
        raise TemplateError(f"the {self.name} template holds special tokens, so its prompt is not "
                            f"plain text: encode it with TEMPLATES['{self.name}']"
                            ".encode_prompt(tok, instruction, input)")

    def encode_prompt(self, tok, instruction, input=""):
        return encode_pieces(tok, self.pieces(instruction, input or ""))

    def encode_example(self, tok, row, count_prompt=True):  # the prompt's length comes free
        prompt = self.encode_prompt(tok, row["instruction"], row.get("input") or "")
        return prompt + encode_pieces(tok, [row["output"], self.EOT]), len(prompt)


TEMPLATES = {t.name: t for t in (Alpaca(), Llama3Chat())}

# where a response ends in a decoded continuation: Alpaca's next header, or Llama 3's end of
# turn / message / text and next header (generation that did not stop at them)
RESPONSE_ENDS = (RESPONSE, "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|start_header_id|>")


def response_of(text: str) -> str:
    """The response in a generated continuation, for both templates: the text before the first
    of RESPONSE_ENDS (a model that goes on to write another example or turn), stripped. For
    Alpaca, LLM-Adapters scores ``output.split("### Response:")[1]`` of prompt + continuation:
    the same text."""
    for end in RESPONSE_ENDS:
        text = text.split(end)[0]
    return text.strip()
