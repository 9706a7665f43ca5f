"""Channel namespaces as configuration: a TOML file says which channels exist and how each
namespace behaves (snapshot, history, slow consumers, rate limits, who may subscribe,
recovery). The shipped file, ``common/namespaces.toml``, declares the market-data and
account namespaces; ``FANOUT_NAMESPACES_FILE`` selects another (docs/protocol.md,
"Defining namespaces").

A namespace's ``pattern`` is its channel names, segment by segment::

    pattern     = namespace *("." segment)
    segment     = literal / placeholder
    literal     = 1*(ALPHA / DIGIT / "_" / "-")
    placeholder = "{" name ":" type [":" max-length] "}" / "{kind}"

Segment types (what one placeholder matches):

    id        1*(ALPHA / DIGIT / "_" / "-")                  one segment, e.g. 42, desk_7
    segment   1*(ALPHA / DIGIT / "_" / "-" / ":")            one segment
    int       1*DIGIT                                       one segment
    interval  1*4DIGIT ("s" / "m" / "h" / "d")               one segment, e.g. 1m
    symbol    segment *("." segment)                        one or more segments; last only
    {kind}    one of the names in the namespace's ``kinds`` table

The pattern is compiled once into one regular expression; `Namespaces.parse` looks a name's
namespace up by its first segment and matches the rest, so a channel check costs a dict
lookup and one ``fullmatch``. Nothing a pattern matches can hold a brace, a space, a quote
or a control character: channel names stay safe in Redis keys, and at most
`MAX_CHANNEL_LENGTH` characters long.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from common import channels
from common.channels import MAX_CHANNEL_LENGTH, Channel, SnapshotMode
from common.errors import BadChannel, ConfigError

SNAPSHOT_MODES = ("merge", "last", "keyed", "none")
OVERFLOW_POLICIES = ("disconnect", "conflate", "drop")
SUBSCRIBE_MODES = ("public", "token", "account")
ACCOUNT_CLAIMS = ("accounts", "sub")
MAX_RATE = 1000.0  # the protocol's limit of a subscribe's max_rate (common/protocol.py)

_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_LITERAL_RE = re.compile(r"[A-Za-z0-9_-]+")
_PLACEHOLDER_RE = re.compile(r"\{([a-z][a-z0-9_]{0,31})(?::([a-z]+))?(?::([0-9]{1,3}))?\}")

# type -> (regular expression, description, example)
_SEGMENT_ONE = r"[A-Za-z0-9_:\-]+"
SEGMENT_TYPES: dict[str, tuple[str, str, str]] = {
    "id": (r"[A-Za-z0-9_\-]+", "letters, digits, _ and -", "42"),
    "segment": (_SEGMENT_ONE, "letters, digits, _, - and :", "A1"),
    "int": (r"[0-9]+", "digits", "7"),
    "interval": (r"[0-9]{1,4}[smhd]", "1 to 4 digits and s, m, h or d", "1m"),
    "symbol": (
        rf"{_SEGMENT_ONE}(?:\.{_SEGMENT_ONE})*",
        "dot-separated segments of letters, digits, _, - and :",
        "MNQ",
    ),
}

_SETTINGS_KEYS = ("snapshot", "recovery", "max_rate", "max_rate_limit")
_NAMESPACE_KEYS = (
    "pattern", "history_length", "history_age", "overflow", "subscribe", "account_segment",
    "account_claims", "kinds", *_SETTINGS_KEYS,
)


class NamespacesError(ConfigError):
    """A bad namespaces file: names the file, the namespace and the field."""

    def __init__(self, setting: str, file: str, namespace: str, field: str, problem: str
                 ) -> None:
        where = f"namespace {namespace!r}: {field}" if namespace else field
        super().__init__(setting, f"{file}: {where}: {problem}")
        self.file = file
        self.namespace = namespace
        self.field = field


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment of a pattern: a literal, a typed placeholder or the kind."""

    literal: str = ""
    name: str = ""  # placeholder name ("kind" for the kind)
    type: str = ""  # a SEGMENT_TYPES key, or "kind"
    max_length: int | None = None


_SNAPSHOT_MODES = {mode.value: mode for mode in SnapshotMode}


@dataclass(frozen=True, slots=True)
class ChannelSettings:
    """How the channels of one namespace (or one kind of it) behave: what edge and ingest
    read of a channel, all in one place (`Channel.settings`)."""

    namespace: str
    groups: tuple[str, ...]  # the pattern's placeholders, in order ("kind" for the kind)
    kind: str  # the namespace, or "<namespace>.<kind>"
    snapshot: str  # merge | last | keyed | none
    history_length: int
    history_age: float  # s
    overflow: str  # disconnect | conflate | drop
    max_rate: float | None  # for subscribes that ask for none
    max_rate_limit: float | None  # most a subscribe may ask for
    subscribe: str  # public | token | account
    account_segment: str  # placeholder that names the account ("account" mode)
    account_claims: tuple[str, ...]  # claims an account segment is checked against
    recovery: bool

    @property
    def snapshot_mode(self) -> SnapshotMode | None:
        # A dict lookup, not SnapshotMode(...): the enum's call showed as ~7 % of an edge's
        # CPU in py-spy during a reconnect storm (every subscribe asks).
        if self.snapshot == "none":
            return None
        return _SNAPSHOT_MODES.get(self.snapshot) or SnapshotMode(self.snapshot)

    def rate(self, asked: float | None) -> float | None:
        """The max_rate a subscribe gets: what it asked for (or the namespace's default),
        at most the namespace's limit."""
        rate = self.max_rate if asked is None else asked
        if self.max_rate_limit is not None and (rate is None or rate > self.max_rate_limit):
            rate = self.max_rate_limit
        return rate


@dataclass(frozen=True, slots=True, eq=False)
class Namespace:
    name: str
    pattern: str
    segments: tuple[Segment, ...]  # after the namespace
    settings: ChannelSettings  # of the namespace (of channels without a kind)
    kinds: Mapping[str, ChannelSettings]  # kind name -> settings; empty without {kind}
    regex: re.Pattern[str]  # the segments, one group per placeholder
    openapi: str  # the same without groups, for JSON Schema
    example: str
    limits: tuple[tuple[int, int], ...]  # (group index, max length) to check after a match
    groups: tuple[str, ...]  # the placeholders' names, one per group ("kind" for the kind)
    kind_group: int  # index of the kind's group, -1 without
    named: tuple[int, int, int]  # group indexes of symbol, interval, account (-1: none)


def _type_regex(seg: Segment, kinds: Sequence[str]) -> str:
    if seg.literal:
        return re.escape(seg.literal)
    if seg.type == "kind":
        return "(?:" + "|".join(re.escape(k) for k in kinds) + ")"
    return f"(?:{SEGMENT_TYPES[seg.type][0]})"


class Namespaces:
    """A loaded, compiled set of namespaces."""

    def __init__(self, namespaces: Sequence[Namespace], source: str) -> None:
        self.source = source
        self.by_name: dict[str, Namespace] = {ns.name: ns for ns in namespaces}
        self.names = tuple(self.by_name)
        self.example = namespaces[0].example if namespaces else "quotes.MNQ"
        self.openapi_pattern = (
            "^(?:" + "|".join(f"{re.escape(ns.name)}\\.{ns.openapi}" for ns in namespaces) + ")$"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def settings(self, kind: str) -> ChannelSettings:
        """The settings of a namespace ("quotes") or a kind ("account.orders")."""
        namespace, _, sub = kind.partition(".")
        ns = self.by_name[namespace]
        return ns.kinds[sub] if sub else ns.settings

    def history(self) -> dict[str, tuple[int, float]]:
        """Namespace -> (max length, max age s)."""
        return {n: (ns.settings.history_length, ns.settings.history_age)
                for n, ns in self.by_name.items()}

    def overflow(self) -> dict[str, str]:
        return {n: ns.settings.overflow for n, ns in self.by_name.items()}

    def parse(self, name: object) -> Channel:
        """Parse and validate a channel name; raise BadChannel saying what is wrong."""
        if not isinstance(name, str):
            raise BadChannel("channel must be a string")
        if not name:
            raise BadChannel("channel must not be empty")
        if len(name) > MAX_CHANNEL_LENGTH:
            raise BadChannel(f"channel longer than {MAX_CHANNEL_LENGTH} characters")
        namespace, sep, rest = name.partition(".")
        if not sep or not rest:
            raise BadChannel(f"channel {name!r} has no namespace: expected e.g. {self.example}")
        ns = self.by_name.get(namespace)
        if ns is None:
            raise BadChannel(
                f"unknown namespace {namespace!r}: expected one of {', '.join(self.names)}"
            )
        match = ns.regex.fullmatch(rest)
        if match is None or (ns.limits and any(len(match[i]) > n for i, n in ns.limits)):
            raise _diagnose(ns, name, rest)
        values: tuple[str, ...] = match.groups()
        settings = ns.kinds[values[ns.kind_group]] if ns.kind_group >= 0 else ns.settings
        symbol, interval, account = ns.named
        return Channel(
            name, ns.name, settings.kind, values[symbol] if symbol >= 0 else None,
            values[interval] if interval >= 0 else None,
            values[account] if account >= 0 else None, values, settings,
        )


def _diagnose(ns: Namespace, name: str, rest: str) -> BadChannel:
    """Why `rest` does not match `ns`: the first segment that is wrong (slow path: errors
    only)."""
    kinds = tuple(ns.kinds)
    for index, seg in enumerate(ns.segments):
        last = index == len(ns.segments) - 1
        if seg.type in ("symbol", "kind") and last:
            part, sep, rest = rest, "", ""
        else:
            part, sep, rest = rest.partition(".")
        if last and sep:
            return BadChannel(f"channel {name!r} has more segments than {ns.pattern}: "
                              f"expected e.g. {ns.example}")
        if seg.type == "kind":
            if part not in kinds:
                return BadChannel(
                    f"unknown {ns.name} channel kind {part!r}: expected one of {', '.join(kinds)}"
                )
        elif seg.literal:
            if part != seg.literal:
                return BadChannel(f"bad channel {name!r}: expected {seg.literal!r} after "
                                  f"{ns.name}, e.g. {ns.example}")
        else:
            regex, description, _ = SEGMENT_TYPES[seg.type]
            if not re.fullmatch(regex, part):
                return BadChannel(
                    f"bad {seg.name} in channel {name!r}: expected {description}, "
                    f"e.g. {ns.example}"
                )
            if seg.max_length is not None and len(part) > seg.max_length:
                return BadChannel(
                    f"bad {seg.name} in channel {name!r}: longer than {seg.max_length} characters"
                )
        if not last and not sep:
            return BadChannel(f"channel {name!r} is too short: expected e.g. {ns.example}")
    return BadChannel(f"bad channel {name!r}: expected e.g. {ns.example}")


# --- loading --------------------------------------------------------------------------------


class _Loader:
    def __init__(self, setting: str, file: str) -> None:
        self.setting = setting
        self.file = file

    def error(self, namespace: str, field: str, problem: str) -> NamespacesError:
        return NamespacesError(self.setting, self.file, namespace, field, problem)

    def number(self, ns: str, field: str, value: object, *, integer: bool = False,
               limit: float = 1e9) -> float:
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            kind = "an integer" if integer else "a number"
            raise self.error(ns, field, f"must be {kind}, got {value!r}")
        assert isinstance(value, int | float)
        if not math.isfinite(value) or not 0 < value <= limit:
            raise self.error(ns, field, f"must be above 0 and at most {limit:g}, got {value!r}")
        return float(value)

    def choice(self, ns: str, field: str, value: object, choices: Sequence[str]) -> str:
        if not isinstance(value, str) or value not in choices:
            raise self.error(ns, field, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def pattern(self, ns: str, value: object) -> tuple[Segment, ...]:
        if not isinstance(value, str):
            raise self.error(ns, "pattern", f"must be a string, got {value!r}")
        parts = value.split(".")
        if parts[0] != ns:
            raise self.error(ns, "pattern", f"{value!r} must start with the namespace, {ns!r}")
        if len(parts) < 2:
            raise self.error(ns, "pattern", f"{value!r} has no segment after the namespace")
        segments: list[Segment] = []
        names: set[str] = set()
        for index, part in enumerate(parts[1:], 1):
            match = _PLACEHOLDER_RE.fullmatch(part)
            if match is None:
                if not _LITERAL_RE.fullmatch(part):
                    raise self.error(ns, "pattern", f"bad segment {part!r}: a literal of "
                                     "letters, digits, _ and -, or {name:type[:max length]}")
                segments.append(Segment(literal=part))
                continue
            name, type_, max_length = match.groups()
            if name == "kind" and type_ in (None, "kind"):
                if max_length is not None:
                    raise self.error(ns, "pattern", "{kind} takes no max length")
                type_ = "kind"
            elif type_ is None or type_ not in SEGMENT_TYPES:
                raise self.error(ns, "pattern", f"segment {part!r}: unknown type {type_!r}: "
                                 f"expected one of {', '.join(SEGMENT_TYPES)}")
            if name in names:
                raise self.error(ns, "pattern", f"segment name {name!r} used twice")
            names.add(name)
            if type_ == "symbol" and index != len(parts) - 1:
                raise self.error(ns, "pattern", f"segment {part!r}: a symbol (it may hold "
                                 "dots) must be the last segment")
            limit = int(max_length) if max_length is not None else None
            if limit is not None and not 1 <= limit <= MAX_CHANNEL_LENGTH:
                raise self.error(ns, "pattern", f"segment {part!r}: max length must be 1 to "
                                 f"{MAX_CHANNEL_LENGTH}")
            segments.append(Segment(name=name, type=type_, max_length=limit))
        return tuple(segments)

    def settings(self, ns: str, kind: str, table: Mapping[str, Any],
                 base: ChannelSettings | None, common: dict[str, Any]) -> ChannelSettings:
        where = ns if kind == ns else f"{ns}.kinds.{kind.partition('.')[2]}"

        def get(key: str, default: Any) -> Any:
            if key in table:
                return table[key]
            return getattr(base, key) if base is not None else default

        snapshot = self.choice(where, "snapshot", get("snapshot", "last"), SNAPSHOT_MODES)
        recovery = get("recovery", True)
        if not isinstance(recovery, bool):
            raise self.error(where, "recovery", f"must be true or false, got {recovery!r}")
        rates: dict[str, float | None] = {}
        for key in ("max_rate", "max_rate_limit"):
            value = get(key, None)
            rates[key] = None if value is None else self.number(where, key, value,
                                                                 limit=MAX_RATE)
        if (rates["max_rate"] is not None and rates["max_rate_limit"] is not None
                and rates["max_rate"] > rates["max_rate_limit"]):
            raise self.error(where, "max_rate", "must not exceed max_rate_limit")
        return ChannelSettings(
            namespace=ns, kind=kind, snapshot=snapshot, recovery=recovery,
            max_rate=rates["max_rate"], max_rate_limit=rates["max_rate_limit"], **common,
        )

    def namespace(self, ns: str, table: object) -> Namespace:
        if not _NAME_RE.fullmatch(ns):
            raise self.error(ns, "name", "must be lower-case letters, digits, _ and -, "
                             "starting with a letter, at most 32 characters")
        if not isinstance(table, dict):
            raise self.error(ns, "", "must be a table")
        for key in table:
            if key not in _NAMESPACE_KEYS:
                raise self.error(ns, key, f"unknown field: expected {', '.join(_NAMESPACE_KEYS)}")
        if "pattern" not in table:
            raise self.error(ns, "pattern", "is required")
        segments = self.pattern(ns, table["pattern"])
        length = int(self.number(ns, "history_length", table.get("history_length", 1000),
                                 integer=True, limit=10_000_000))
        age = self.number(ns, "history_age", table.get("history_age", 300))
        overflow = self.choice(ns, "overflow", table.get("overflow", "disconnect"),
                               OVERFLOW_POLICIES)
        subscribe = self.choice(ns, "subscribe", table.get("subscribe", "token"),
                                SUBSCRIBE_MODES)
        placeholders = [s.name for s in segments if s.name and s.type != "kind"]
        account_segment = table.get("account_segment", "")
        claims: object = table.get("account_claims", ["accounts"])
        if subscribe == "account" or "account_segment" in table:
            if "account_segment" not in table and "account" in placeholders:
                account_segment = "account"
            if account_segment not in placeholders:
                raise self.error(ns, "account_segment", f"must name a segment of the pattern "
                                 f"({', '.join(placeholders) or 'none'}), got "
                                 f"{account_segment!r}")
        if (not isinstance(claims, list) or not claims
                or any(c not in ACCOUNT_CLAIMS for c in claims)):
            raise self.error(ns, "account_claims", f"must be a list of {', '.join(ACCOUNT_CLAIMS)}"
                             f", got {claims!r}")
        common = {
            "groups": tuple(s.name for s in segments if not s.literal),
            "history_length": int(length), "history_age": age, "overflow": overflow,
            "subscribe": subscribe, "account_segment": account_segment,
            "account_claims": tuple(claims),
        }
        settings = self.settings(ns, ns, table, None, common)
        has_kind = any(s.type == "kind" for s in segments)
        raw_kinds = table.get("kinds")
        kinds: dict[str, ChannelSettings] = {}
        if has_kind != (raw_kinds is not None):
            raise self.error(ns, "kinds", "a pattern with {kind} needs a kinds table, and "
                             "only such a pattern may have one")
        if raw_kinds is not None:
            if not isinstance(raw_kinds, dict) or not raw_kinds:
                raise self.error(ns, "kinds", "must be a table of at least one kind")
            for name, sub in raw_kinds.items():
                where = f"{ns}.kinds.{name}"
                if not _LITERAL_RE.fullmatch(name):
                    raise self.error(ns, f"kinds.{name}", "a kind is letters, digits, _ and -")
                if not isinstance(sub, dict):
                    raise self.error(ns, f"kinds.{name}", "must be a table")
                for key in sub:
                    if key not in _SETTINGS_KEYS:
                        raise self.error(where, key, f"unknown field: a kind may set "
                                         f"{', '.join(_SETTINGS_KEYS)}")
                kinds[name] = self.settings(ns, f"{ns}.{name}", sub, settings, common)
        groups = tuple(s.name for s in segments if not s.literal)

        def index(name: str) -> int:
            found = [i for i, s in enumerate(x for x in segments if not x.literal)
                     if s.name == name and s.type != "kind"]
            return found[0] if found else -1

        regex_parts: list[str] = []
        openapi_parts: list[str] = []
        limits: list[tuple[int, int]] = []
        group = 0
        for seg in segments:
            plain = _type_regex(seg, tuple(kinds))
            openapi_parts.append(plain)
            if seg.literal:
                regex_parts.append(plain)
                continue
            group += 1
            regex_parts.append(f"({plain})")
            if seg.max_length is not None:
                limits.append((group, seg.max_length))
        example = ".".join([ns] + [
            s.literal or (next(iter(kinds)) if s.type == "kind" else SEGMENT_TYPES[s.type][2])
            for s in segments
        ])
        return Namespace(
            name=ns, pattern=table["pattern"], segments=segments, settings=settings,
            kinds=kinds, regex=re.compile(r"\.".join(regex_parts)),
            openapi=r"\.".join(openapi_parts), example=example, limits=tuple(limits),
            groups=groups, kind_group=groups.index("kind") if has_kind else -1,
            named=(index("symbol"), index("interval"), index("account")),
        )

    def load(self, data: Mapping[str, Any]) -> Namespaces:
        for key in data:
            if key != "namespaces":
                raise self.error("", key, "unknown top-level field: expected [namespaces.<name>]")
        tables = data.get("namespaces")
        if not isinstance(tables, dict) or not tables:
            raise self.error("", "namespaces", "declare at least one [namespaces.<name>] table")
        return Namespaces([self.namespace(name, t) for name, t in tables.items()], self.file)


def parse_namespaces(text: str, file: str = "<string>",
                     setting: str = "FANOUT_NAMESPACES_FILE") -> Namespaces:
    """Namespaces from TOML text; NamespacesError names the file, namespace and field."""
    loader = _Loader(setting, file)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise loader.error("", "TOML", str(exc)) from None
    return loader.load(data)


def load_namespaces(path: str, setting: str = "FANOUT_NAMESPACES_FILE") -> Namespaces:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(1024 * 1024)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(setting, f"cannot read {path!r}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    return parse_namespaces(text, path, setting)


DEFAULT_FILE = "common/namespaces.toml"
DEFAULT = parse_namespaces(
    resources.files("common").joinpath("namespaces.toml").read_text(encoding="utf-8"),
    DEFAULT_FILE,
)


def active() -> Namespaces:
    """The namespaces channel names are parsed with in this process."""
    return channels.active_namespaces()


def activate(namespaces: Namespaces) -> None:
    """Use `namespaces` for every channel name parsed from now on (at start, before any)."""
    channels.use_namespaces(namespaces)


def use_file(path: str) -> Namespaces:
    """Activate the namespaces of `path` ("" = the shipped ones), unless active already."""
    current = active()
    if current.source != (path or DEFAULT_FILE):
        activate(load_namespaces(path) if path else DEFAULT)
    return active()


activate(DEFAULT)
