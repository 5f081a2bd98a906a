"""Hypothesis strategies for any protobuf message, built from its descriptor.

``messages(cls)`` draws instances of ``cls`` whose every field may be set to
ordinary, extreme or hostile values: integers at their type's limits, NaN and
infinities, unknown enum numbers, long or odd strings, arbitrary bytes, nested
messages, repeated fields. ``raw_bytes()`` draws byte strings that may not be
a valid encoding of anything.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

_INT_LIMITS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def _int(lo: int, hi: int):
    edges = [v for v in (lo, hi, -1, 0, 1, 2, 3, 16, 255, 2**31 - 1, 2**32) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -1000), min(hi, 1000)), st.integers(lo, hi))


def _scalar(fd):
    t = fd.type
    if t in _INT_LIMITS:
        return _int(*_INT_LIMITS[t])
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if t == F.TYPE_FLOAT else 64)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return st.one_of(
            st.text(max_size=24),
            st.sampled_from(["", "..", "../../etc/passwd", "a/b", "\x00", "x" * 300, "stage1.W1", "step-1"]),
        )
    if t == F.TYPE_BYTES:
        return st.binary(max_size=96)
    if t == F.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 99))
    raise TypeError(f"unsupported field type {t}")


def _repeated(fd) -> bool:
    r = getattr(fd, "is_repeated", None)
    return bool(r) if r is not None else fd.label == F.LABEL_REPEATED


def _field(fd, depth: int, overrides: dict):
    if fd.name in overrides:
        base = overrides[fd.name]
    elif fd.type == F.TYPE_MESSAGE:
        if fd.message_type.GetOptions().map_entry:
            return st.just(None)  # no maps in the downpour protos
        base = _msg_dict(fd.message_type, depth + 1, overrides) if depth < 2 else st.just({})
    else:
        base = _scalar(fd)
    if _repeated(fd):
        return st.lists(base, max_size=4)
    return base


def _msg_dict(desc, depth: int, overrides: dict):
    fields = {fd.name: _field(fd, depth, overrides) for fd in desc.fields}
    return st.fixed_dictionaries({}, optional=fields)


def _fill(msg, d: dict) -> None:
    for name, value in d.items():
        if value is None:
            continue
        fd = msg.DESCRIPTOR.fields_by_name[name]
        if fd.type == F.TYPE_MESSAGE:
            if _repeated(fd):
                for v in value:
                    _fill(getattr(msg, name).add(), v)
            else:
                sub = getattr(msg, name)
                sub.SetInParent()
                _fill(sub, value)
        elif _repeated(fd):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)


def messages(cls, **overrides):
    """Instances of the protobuf message class ``cls``; ``overrides`` give strategies for named fields."""
    return _msg_dict(cls.DESCRIPTOR, 0, overrides).map(lambda d: _build(cls, d))


def _build(cls, d):
    m = cls()
    _fill(m, d)
    return m


def raw_bytes():
    """Byte strings for a message slot: garbage, truncated varints, huge length prefixes."""
    return st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\xff" * 12, b"\x12\x80\x80\x80\x80\x10abc"]),
    )
