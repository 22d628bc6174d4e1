"""Chat templates rendered with jinja2 as transformers renders them: strings, ids, errors."""
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

import fastlora as fl  # noqa: E402
from fastlora.data.chat import CHATML_TEMPLATE, render  # noqa: E402
from fastlora.testing.hf_models import make_chat_tokenizer, make_gpt2_tokenizer  # noqa: E402

ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content']"
          " + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
ALTERNATING = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
               "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}{% endfor %}")
TOOLS_JSON = ("{% for message in messages %}{% if loop.index0 > 1 %}{% break %}{% endif %}"
              "{{ message | tojson }}\n{% endfor %}")
TEMPLATES = {"chatml": CHATML_TEMPLATE, "zephyr": ZEPHYR, "alternating": ALTERNATING, "tojson_break": TOOLS_JSON}
CHAT = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "2 + 3 <|im_end|> é 😀?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4 + 4?"}]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    texts = [m["content"] for m in CHAT] * 20 + ["<|user|> <|assistant|> [INST] [/INST]"] * 5
    dirs = {}
    for name, template in TEMPLATES.items():
        dirs[name] = tmp_path_factory.mktemp(name)
        make_chat_tokenizer(dirs[name], texts, template)
    return dirs


def _their_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("prompt", [False, True])
def test_strings_and_ids_equal_transformers(tokenizer_dirs, name, prompt):
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs[name])
    ours = fl.load_tokenizer(tokenizer_dirs[name])
    chat = CHAT[1:] if name == "alternating" else CHAT
    want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == want
    assert ours.apply_chat_template(chat, add_generation_prompt=prompt) == _their_ids(
        theirs, chat, add_generation_prompt=prompt)


def test_chatml_is_the_default_and_marks_special_tokens(tokenizer_dirs, tmp_path):
    make_gpt2_tokenizer(tmp_path, ["hello there"] * 10)
    tok = fl.load_tokenizer(tmp_path)
    assert tok.chat_template is None
    text = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\n2 + 3 <|im_end|> é 😀?"
                    "<|im_end|>\n<|im_start|>assistant\n")


def test_generation_blocks_give_the_assistant_spans():
    template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}")
    text, spans = render(template, CHAT, with_spans=True)
    assert [text[a:b] for a, b in spans] == ["5"]
    assert text.index("assistant: 5") + len("assistant: ") == spans[0][0]


def test_template_errors_name_the_error_and_the_message(tokenizer_dirs):
    tok = fl.load_tokenizer(tokenizer_dirs["alternating"])
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match=r"Conversation roles must alternate.*\(at messages\[1\], role 'user'\)"):
        tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ValueError, match=r"messages\[0\] needs a str 'content'"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match="the chat template does not parse"):
        render("{% for %}", CHAT)


def test_the_sandbox_keeps_templates_out_of_python():
    hostile = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="the chat template failed"):
        render(hostile, CHAT)
