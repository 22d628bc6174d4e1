"""InstructionFormatter: the seed's template, prompt/format agreement, and parse as an exact inverse."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlora.data import InstructionFormatter

FMT = InstructionFormatter()

# Text built from header fragments hits the ambiguous cases far more often than random text.
FRAGMENTS = ["\n", "### Response:", "### Input:", "### Instruction:", "#", ":", " ", "a", "\n\n"]
nasty = st.lists(st.sampled_from(FRAGMENTS), max_size=8).map("".join)
field = st.one_of(st.text(max_size=30), nasty)


def test_template_matches_the_seed():
    assert FMT.format("Translate to French", "Hello", "Bonjour") == (
        "### Instruction:\nTranslate to French\n### Input:\nHello\n### Response:\nBonjour")


def test_empty_input_leaves_the_input_section_out():
    text = FMT.format("Summarize", "", "Short summary")
    assert text == "### Instruction:\nSummarize\n### Response:\nShort summary"
    assert "### Input:" not in text


def test_prompt_is_format_up_to_the_output():
    assert FMT.prompt("Do it", "now") + "done" == FMT.format("Do it", "now", "done")
    assert FMT.prompt("Do it").endswith("### Response:\n")


@settings(max_examples=300, deadline=None)
@given(field, field, field)
def test_parse_inverts_format_or_format_refuses(instruction, input_, output):
    try:
        text = FMT.format(instruction, input_, output)
    except ValueError as exc:
        # a refusal names a field that really holds header text
        named = [f for f, v in [("instruction", instruction), ("input", input_)] if f in str(exc)]
        assert named and "###" in {"instruction": instruction, "input": input_}[named[0]]
        return
    assert FMT.parse(text) == {"instruction": instruction, "input": input_, "output": output}


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="#")), st.text(), st.text())
def test_format_never_refuses_fields_without_headers(instruction, input_, output):
    # only text containing '#' can hold a header; the output may hold anything at all
    text = FMT.format(instruction, input_.replace("#", ""), output)
    assert FMT.parse(text)["output"] == output


@pytest.mark.parametrize("instruction, input_, bad_field", [
    ("a\n### Response:\nb", "", "instruction"),
    ("a\n### Response:", "x", "instruction"),      # runs into the Input header's leading \n
    ("a\n### Input:\nb", "", "instruction"),
    ("a\n### Input:\nb", "x", "instruction"),
    ("ok", "x\n### Response:\ny", "input"),
    ("ok", "x\n### Response:", "input"),
    ("", "### Response:", "input"),                # completed by the newline before the input
    ("ok", "### Response:\nyes", "input"),
])
def test_ambiguous_fields_are_refused_by_name(instruction, input_, bad_field):
    with pytest.raises(ValueError, match=f"^{bad_field} contains text that reads as a section"):
        FMT.format(instruction, input_, "out")


def test_headers_inside_the_output_or_input_are_fine():
    text = FMT.format("q", "see\n### Input:\nthis", "a\n### Response:\nb\n### Input:\n")
    assert FMT.parse(text) == {"instruction": "q", "input": "see\n### Input:\nthis",
                               "output": "a\n### Response:\nb\n### Input:\n"}


def test_parse_rejects_text_that_is_not_formatted():
    with pytest.raises(ValueError, match="must start with"):
        FMT.parse("hello")
    with pytest.raises(ValueError, match="must start with"):
        FMT.parse("### Instruction:\nno response header")
    with pytest.raises(TypeError, match="formatted must be a str"):
        FMT.parse(None)


def test_fields_must_be_strings():
    with pytest.raises(TypeError, match="instruction must be a str"):
        FMT.format(1, "", "")
    with pytest.raises(TypeError, match="output must be a str"):
        FMT.format("", "", None)


def test_custom_headers_round_trip_and_bad_headers_are_refused():
    fmt = InstructionFormatter("<|user|>", "<|context|>", "<|assistant|>")
    text = fmt.format("hi", "ctx", "hello")
    assert text == "<|user|>\nhi\n<|context|>\nctx\n<|assistant|>\nhello"
    assert fmt.parse(text) == {"instruction": "hi", "input": "ctx", "output": "hello"}
    with pytest.raises(ValueError, match="must differ"):
        InstructionFormatter("A", "A", "B")
    with pytest.raises(ValueError, match="response_header must be a non-empty single line"):
        InstructionFormatter(response_header="a\nb")
