"""Record formats: what one training record may look like, and its canonical form.

Four formats, told apart per record by their keys (after the user's field map):

    Alpaca    {"instruction": str, "input": str (optional), "output": str}
    chat      {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]}
    ShareGPT  {"conversations": [{"from": "human" | "gpt" | "system", "value": str}, ...],
               "system": str (optional)}          -> read as chat (human -> user, gpt -> assistant)
    text      {"text": str}                        -> every token scored (continued pretraining)

A record with "messages" is chat, with "conversations" ShareGPT, with "instruction" or
"output" Alpaca, with "text" text. Other keys (ids, sources, ...) are ignored.

canonical(item) returns {"instruction", "input", "output"}, {"messages": [...]} or {"text"}:
the form the rest of the pipeline reads. A field map renames the fields a dataset uses to
these names, field_map={"instruction": "question", "output": "answer"} (the CLI's
--field-map instruction=question,output=answer); the inner keys of a conversation ("role",
"content", "from", "value") can be mapped the same way.

Every problem is a ValueError that names the place ("data.jsonl: record 3 (line 4)"), the
field, and for a conversation the message: an unknown role, a conversation without an
assistant turn, a field of the wrong type.
"""

ALPACA, CHAT, SHAREGPT, TEXT = "alpaca", "chat", "sharegpt", "text"
FIELDS = ("instruction", "input", "output", "text", "messages", "conversations", "system",
          "role", "content", "from", "value")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}


def check_field_map(field_map):
    """-> {our field name: the dataset's name} from a dict, or from "a=b,c=d" text (the CLI)."""
    if field_map is None:
        return {}
    if isinstance(field_map, str):
        return parse_field_map(field_map)
    if not isinstance(field_map, dict):
        raise TypeError(f"field_map must be a dict {{our name: your name}} such as "
                        f"{{'instruction': 'question'}}, got {type(field_map).__name__}")
    for ours, theirs in field_map.items():
        if ours not in FIELDS:
            raise ValueError(f"field_map: {ours!r} is not a field fastlora reads; map one of "
                             f"{list(FIELDS)} to your dataset's name for it")
        if not isinstance(theirs, str) or not theirs:
            raise ValueError(f"field_map[{ours!r}] must be a non-empty str (your dataset's name "
                             f"for the field), got {theirs!r}")
    return dict(field_map)


def parse_field_map(text):
    """"instruction=question,output=answer" -> {"instruction": "question", "output": "answer"}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ValueError(f"field map {text!r}: {part!r} is not of the form ours=theirs "
                             f"(e.g. instruction=question,output=answer)")
        if ours.strip() in out:
            raise ValueError(f"field map {text!r}: {ours.strip()!r} is mapped twice")
        out[ours.strip()] = theirs.strip()
    if not out:
        raise ValueError(f"field map {text!r} maps nothing; write e.g. instruction=question,output=answer")
    return check_field_map(out)


class RecordReader:
    """Turns raw records (dicts) into canonical ones, reading names through a field map."""

    def __init__(self, field_map=None):
        self.field_map = check_field_map(field_map)
        self.name = {f: self.field_map.get(f, f) for f in FIELDS}

    def _called(self, field):
        """How a message names `field`: 'question' (mapped to 'instruction' by field_map)."""
        theirs = self.name[field]
        return repr(theirs) if theirs == field else f"{theirs!r} (mapped to {field!r} by field_map)"

    def kind(self, item):
        """Which format a raw record is in, or None."""
        n = self.name
        if n["messages"] in item:
            return CHAT
        if n["conversations"] in item:
            return SHAREGPT
        if n["instruction"] in item or n["output"] in item:
            return ALPACA
        if n["text"] in item:
            return TEXT
        return None

    def columns(self, kind):
        """(required, optional) raw column names of a format: what a Parquet file must hold."""
        n = self.name
        return {ALPACA: ([n["instruction"], n["output"]], [n["input"]]),
                CHAT: ([n["messages"]], []),
                SHAREGPT: ([n["conversations"]], [n["system"]]),
                TEXT: ([n["text"]], [])}[kind]

    def canonical(self, item, at):
        """The canonical record for raw record `item`; `at` names it in errors."""
        if not isinstance(item, dict):
            raise ValueError(f"{at} is a {json_type(item)}, expected an object (Alpaca "
                             f"'instruction'/'output', chat 'messages', ShareGPT 'conversations' "
                             f"or 'text')")
        kind = self.kind(item)
        if kind is None:
            raise ValueError(f"{at}: no field of a known format: expected {self._called('instruction')} "
                             f"and {self._called('output')} (Alpaca), {self._called('messages')} (chat), "
                             f"{self._called('conversations')} (ShareGPT) or {self._called('text')}; "
                             f"the record has {_keys(item)}")
        return getattr(self, "_" + kind)(item, at)

    def _string(self, item, field, at, default=None):
        key = self.name[field]
        if key not in item or (default is not None and item[key] is None):
            if default is None:
                raise ValueError(f"{at}: missing required field {self._called(field)}")
            return default
        value = item[key]
        if not isinstance(value, str):
            raise ValueError(f"{at}: field {self._called(field)} must be a string, got "
                             f"{json_type(value)} {preview(value)}")
        return value

    def _alpaca(self, item, at):
        for field in ("instruction", "output"):
            self._string(item, field, at)  # both present, in this order of complaint
        return {"instruction": self._string(item, "instruction", at),
                "input": self._string(item, "input", at, default=""),
                "output": self._string(item, "output", at)}

    def _text(self, item, at):
        return {"text": self._string(item, "text", at)}

    def _turns(self, item, field, at):
        turns = item[self.name[field]]
        if not isinstance(turns, (list, tuple)):
            raise ValueError(f"{at}: field {self._called(field)} must be a list of messages, got "
                             f"{json_type(turns)} {preview(turns)}")
        if not turns:
            raise ValueError(f"{at}: field {self._called(field)} is an empty conversation")
        return turns

    def _message(self, turn, field, i, keys, at):
        """-> (role, content) of message i, read through `keys` = (role key, content key)."""
        where = f"{at}: {self.name[field]}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} is a {json_type(turn)}, expected an object with "
                             f"{self._called(keys[0])} and {self._called(keys[1])}")
        values = []
        for key in keys:
            if self.name[key] not in turn:
                raise ValueError(f"{where}: missing field {self._called(key)}")
            value = turn[self.name[key]]
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {self._called(key)} must be a string, got "
                                 f"{json_type(value)} {preview(value)}")
            values.append(value)
        return values

    def _chat(self, item, at):
        messages = []
        for i, turn in enumerate(self._turns(item, "messages", at)):
            role, content = self._message(turn, "messages", i, ("role", "content"), at)
            if role not in CHAT_ROLES:
                raise ValueError(f"{at}: {self.name['messages']}[{i}]: unknown role {role!r} in field "
                                 f"{self._called('role')}; chat roles are {list(CHAT_ROLES)}")
            # other keys (tool_calls, name, ...) stay: a chat template may read them
            extra = {k: v for k, v in turn.items() if k not in (self.name["role"], self.name["content"])}
            messages.append({**extra, "role": role, "content": content})
        return self._conversation(messages, "messages", at)

    def _sharegpt(self, item, at):
        messages = []
        system = self._string(item, "system", at, default="")
        if system:
            messages.append({"role": "system", "content": system})
        for i, turn in enumerate(self._turns(item, "conversations", at)):
            speaker, value = self._message(turn, "conversations", i, ("from", "value"), at)
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(f"{at}: {self.name['conversations']}[{i}]: unknown role {speaker!r} in "
                                 f"field {self._called('from')}; ShareGPT roles are human, gpt and "
                                 f"system (or {', '.join(CHAT_ROLES)})")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
        return self._conversation(messages, "conversations", at)

    def _conversation(self, messages, field, at):
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{at}: field {self._called(field)} has no assistant turn, so nothing "
                             f"in it would be trained on (roles: {[m['role'] for m in messages]})")
        return {"messages": messages}


def record_kind(record):
    """The format of a canonical record."""
    return CHAT if "messages" in record else TEXT if "text" in record else ALPACA


def json_type(value):
    names = {dict: "object", list: "array", tuple: "array", str: "string", bool: "boolean",
             int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def preview(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _keys(item):
    keys = list(item)
    return repr(keys) if len(keys) <= 8 else repr(keys[:8])[:-1] + ", ...]"
