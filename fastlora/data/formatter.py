"""InstructionFormatter: the Alpaca-style prompt template, and its exact inverse.

    ### Instruction:
    {instruction}
    ### Input:
    {input}
    ### Response:
    {output}

The Input section is left out when `input` is empty, as Alpaca does. `prompt()` is the text
up to and including the response header; format() == prompt() + output, which is what lets
the dataset mask the prompt exactly and lets generation start where training's labels did.

parse() inverts format(). Some fields would make that impossible: an instruction containing
"\\n### Response:\\n" reads back as a shorter instruction, and an input that starts with
"### Response:" breaks it too (the newline before the input completes the header). format()
refuses such fields with a ValueError naming the field, so every string it returns parses
back to its fields.
"""
from __future__ import annotations



class InstructionFormatter:
    """Formats (instruction, input, output) records; the three headers can be changed."""

    def __init__(self, instruction_header="### Instruction:", input_header="### Input:",
                 response_header="### Response:"):
        headers = {"instruction_header": instruction_header, "input_header": input_header,
                   "response_header": response_header}
        for name, header in headers.items():
            if not isinstance(header, str) or not header.strip() or "\n" in header:
                raise ValueError(f"{name} must be a non-empty single line, got {header!r}")
        if len(set(headers.values())) != 3:
            raise ValueError(f"the three headers must differ, got {list(headers.values())}")
        self.instruction_header = instruction_header
        self.input_header = input_header
        self.response_header = response_header
        self._start = instruction_header + "\n"
        self._input_sep = "\n" + input_header + "\n"
        self._response_sep = "\n" + response_header + "\n"

    def prompt(self, instruction: str, input: str = "") -> str:  # noqa: A002 - the Alpaca field is called input
        """The text the model sees before its answer, ending with the response header line."""
        _check_str("instruction", instruction)
        _check_str("input", input)
        text = self._start + instruction
        if input:
            text += self._input_sep + input
        return text + self._response_sep

    def format(self, instruction: str, input: str, output: str) -> str:  # noqa: A002
        """prompt(instruction, input) + output; refuses fields that parse() could not recover."""
        _check_str("output", output)
        text = self.prompt(instruction, input) + output
        if self._split(text) != {"instruction": instruction, "input": input, "output": output}:
            field = self._culprit(instruction, input)
            raise ValueError(
                f"{field} contains text that reads as a section header ({self._response_sep!r} "
                f"or {self._input_sep!r}, counting the newline next to the field), so the "
                f"formatted text could not be parsed back; change that line in the {field}")
        return text

    def _culprit(self, instruction, input_):
        """Which field breaks the round trip: try each one alone among harmless neighbours.

        (The output never can: parse takes everything after the first response header.)
        """
        for name in ("instruction", "input"):
            trial = {"instruction": "x", "input": "x" if input_ else "", "output": ""}
            trial[name] = instruction if name == "instruction" else input_
            if self._split(self.prompt(trial["instruction"], trial["input"])) != trial:
                return name
        return "instruction together with input"

    def parse(self, formatted):
        """Invert format(): -> {"instruction": ..., "input": ..., "output": ...}."""
        _check_str("formatted", formatted)
        fields = self._split(formatted)
        if fields is None:
            raise ValueError(f"not a formatted example: it must start with {self._start!r} and "
                             f"contain {self._response_sep!r}; got {formatted[:60]!r}...")
        return fields

    def _split(self, text):
        if not text.startswith(self._start):
            return None
        rest = text[len(self._start):]
        cut = rest.find(self._response_sep)
        if cut < 0:
            return None
        head, output = rest[:cut], rest[cut + len(self._response_sep):]
        instruction, sep, input_ = head.partition(self._input_sep)
        return {"instruction": instruction, "input": input_ if sep else "", "output": output}

    def __repr__(self):
        return (f"InstructionFormatter({self.instruction_header!r}, {self.input_header!r}, "
                f"{self.response_header!r})")


def _check_str(name, value):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
