"""Chat templates: a model's Jinja template rendered with `jinja2` the way transformers renders it.

The environment is transformers' own: sandboxed and immutable, trim_blocks and lstrip_blocks,
the loopcontrols extension, a `{% generation %}` block (whose character spans are recorded, so
a caller can score only the assistant's text), `tojson` without HTML escaping,
`raise_exception`, `strftime_now`, and the tokenizer's special tokens as variables
(bos_token, eos_token, ...). A template is untrusted text from a model folder: the sandbox
keeps it from reaching Python internals.
"""
import json
import re
from contextvars import ContextVar
from datetime import datetime

# ChatML, for a tokenizer without a template of its own
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# (blocks rendered so far, [(start, end)] of {% generation %} output) while render() tracks them
_tracking = ContextVar("generation_tracking", default=None)
_compiled = {}


def _require_jinja():
    try:
        import jinja2
    except ImportError:
        raise ImportError("rendering a chat template needs jinja2: pip install 'fastlora[hf]'") from None
    return jinja2


def _environment():
    jinja2 = _require_jinja()
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """{% generation %}...{% endgeneration %}: renders its body and notes where it went."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracking = _tracking.get()
            if tracking is not None:  # render() streams blocks, so everything before this one is in `blocks`
                blocks, spans = tracking
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def compile_template(template):
    if template not in _compiled:
        jinja2 = _require_jinja()
        try:
            _compiled[template] = _environment().from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ValueError(f"the chat template does not parse: {exc} (line {exc.lineno})") from None
    return _compiled[template]


def check_messages(messages, where="messages"):
    """A list of {"role": str, "content": str, ...} dicts; ValueError naming the message otherwise."""
    if isinstance(messages, (str, dict)) or not hasattr(messages, "__iter__"):
        raise TypeError(f"{where} must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    messages = list(messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"{where}[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"{where}[{i}] needs a str {key!r}, got {m.get(key)!r}")
    return [dict(m) for m in messages]


def render(template, messages, add_generation_prompt=False, special_tokens=None, with_spans=False, **kwargs):
    """The template rendered for `messages` -> str, or (str, [(start, end)] of its generation blocks).

    A template that fails names the Jinja error and the first message whose prefix fails.
    """
    jinja2 = _require_jinja()
    messages = check_messages(messages)
    compiled = compile_template(template)
    variables = {**(special_tokens or {}), **kwargs}
    blocks, spans = [], []
    token = _tracking.set((blocks, spans))
    try:
        for block in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
            blocks.append(block)
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"the chat template failed: {exc}{_failing_message(compiled, messages, variables)}") from None
    finally:
        _tracking.reset(token)
    text = "".join(blocks)
    return (text, spans) if with_spans else text


def _failing_message(compiled, messages, variables):
    """' (at messages[i])' for the shortest prefix of messages that fails to render, or ''."""
    for i in range(1, len(messages) + 1):
        try:
            compiled.render(messages=messages[:i], add_generation_prompt=False, **variables)
        except Exception:  # noqa: BLE001 - any failure marks the message
            return f" (at messages[{i - 1}], role {messages[i - 1]['role']!r})"
    return ""


# `{% generation %}` (or `{%- generation -%}`): the template marks the assistant's text itself
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*[-+]?%\}")


def assistant_spans(render_fn, template, messages):
    """(text of the whole conversation, [(start, end)] of the text each assistant turn produces).

    render_fn(messages, add_generation_prompt=False, with_spans=False) renders `template`.
    Where the template has {% generation %} blocks, their spans are the answer (transformers'
    return_assistant_tokens_mask, which TRL's assistant_only_loss reads). Otherwise each
    assistant turn i is found by rendering prefixes: the conversation before it with the
    generation prompt, P, and through it, Q; its span is Q[len(P):], exactly the text a model
    asked with P must produce to end its turn (the content and the end-of-turn marks). A
    template that renders a prefix differently from the start of the whole conversation is
    refused, naming the message: its assistant text cannot be found that way.
    """
    text, spans = render_fn(messages, with_spans=True)
    if GENERATION_BLOCK.search(template):
        return text, spans
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_fn(messages[:i], add_generation_prompt=True)
        through = render_fn(messages[:i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(f"messages[{i}] (assistant): the chat template renders the conversation up to "
                             f"this turn differently from the start of the whole conversation, so the "
                             f"assistant's text cannot be found by rendering prefixes; use a template "
                             f"with a {{% generation %}} block")
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return text, spans


def reply_parts(render_fn, messages, i):
    """(prompt text, end-of-turn text) of assistant turn i: the template's rendering of
    messages[:i] with the generation prompt, and what follows the content in its turn
    ('<|im_end|>\\n' for ChatML), or None where the content is not found at the turn's start."""
    before = render_fn(messages[:i], add_generation_prompt=True)
    reply = render_fn(messages[:i + 1])[len(before):]
    content = messages[i]["content"]
    return before, (reply[len(content):] if reply.startswith(content) else None)
