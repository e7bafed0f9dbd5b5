"""Wire schema: JSON only, whitelisted types, size caps, finite and clamped numbers."""

import json

import pytest

from telepresence.stream.call_messages import (
    CameraRateMessage,
    parse_call_message,
)
from telepresence.stream.messages import (
    CHANNEL_MAX_BYTES,
    SIGNALING_MAX_BYTES,
    InvalidFieldError,
    JoinMessage,
    MalformedMessageError,
    MessageError,
    MessageTooLargeError,
    OfferMessage,
    HelloMessage,
    PingMessage,
    PongMessage,
    PoseLimits,
    PoseMessage,
    ResetMemoryMessage,
    StampsMessage,
    StatsMessage,
    UnknownMessageTypeError,
    encode_message,
    parse_channel_message,
    parse_sender_message,
    parse_signaling_message,
)


def pose(**fields):
    return json.dumps({"type": "pose", "seq": 1, "t": 0.0, "yaw": 0, "pitch": 0, "dist": 1.0, **fields})


@pytest.mark.parametrize(
    "raw",
    ["", "{", "not json", "[1, 2]", '"join"', "42", "{}", '{"type": 7}', b'{"type": "join"}', "[" * 5000 + "]" * 5000],
)
def test_malformed_messages_are_rejected(raw):
    with pytest.raises(MalformedMessageError) as info:
        parse_signaling_message(raw)
    assert info.value.code == "bad-json"


def test_unknown_types_are_rejected():
    with pytest.raises(UnknownMessageTypeError) as info:
        parse_signaling_message('{"type": "shutdown"}')
    assert info.value.code == "unknown-type"
    with pytest.raises(UnknownMessageTypeError):
        parse_channel_message('{"type": "join", "room": "demo", "role": "viewer"}')  # a signaling type on the channel


def test_huge_messages_are_rejected_before_parsing():
    with pytest.raises(MessageTooLargeError):
        parse_signaling_message(json.dumps({"type": "join", "room": "demo", "role": "viewer", "pad": "x" * SIGNALING_MAX_BYTES}))
    with pytest.raises(MessageTooLargeError):
        parse_channel_message(pose(pad="x" * CHANNEL_MAX_BYTES))
    with pytest.raises(MessageTooLargeError):  # counted in bytes, not characters
        parse_channel_message(pose(pad="é" * (CHANNEL_MAX_BYTES // 2)))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_non_finite_pose_numbers_are_rejected(literal):
    raw = pose().replace('"yaw": 0', f'"yaw": {literal}')
    with pytest.raises((MalformedMessageError, InvalidFieldError)):
        parse_channel_message(raw)


@pytest.mark.parametrize(
    "fields",
    [{"yaw": "10"}, {"yaw": None}, {"yaw": True}, {"seq": -1}, {"seq": 1.5}, {"seq": 2**60}, {"dist": [1]}],
)
def test_mistyped_pose_fields_are_rejected(fields):
    with pytest.raises(InvalidFieldError):
        parse_channel_message(pose(**fields))


@pytest.mark.parametrize("digits", [400, 900])
def test_huge_integer_literals_are_rejected_not_a_crash(digits):
    with pytest.raises(InvalidFieldError):
        parse_channel_message('{"type": "ping", "t": ' + "9" * digits + "}")
    with pytest.raises(MessageError):  # beyond Python's int-parsing limit: malformed, still no crash
        parse_signaling_message('{"type": "join", "room": "demo", "role": "viewer", "x": ' + "9" * 5000 + "}")


def test_pose_is_clamped_to_limits():
    limits = PoseLimits(yaw_deg=40, pitch_deg=25, dist_min=0.6, dist_max=1.6)
    message = parse_channel_message(pose(yaw=1000, pitch=-90, dist=0.01)).clamped(limits)
    assert (message.yaw, message.pitch, message.dist) == (40, -25, 0.6)
    message = parse_channel_message(pose(yaw=-12.5, pitch=3, dist=5)).clamped(limits)
    assert (message.yaw, message.pitch, message.dist) == (-12.5, 3, 1.6)


def test_missing_fields_are_named():
    with pytest.raises(InvalidFieldError, match="missing field 'dist'"):
        parse_channel_message('{"type": "pose", "seq": 1, "t": 0, "yaw": 0, "pitch": 0}')


def test_valid_messages_parse_to_value_objects():
    assert parse_signaling_message('{"type": "join", "room": "demo", "role": "viewer"}') == JoinMessage("demo", "viewer")
    offer = parse_signaling_message(json.dumps({"type": "offer", "to": "abc123", "sdp": "v=0\r\n"}))
    assert isinstance(offer, OfferMessage) and offer.to == "abc123"
    assert parse_channel_message('{"type": "ping", "t": 12}') == PingMessage(12.0)
    assert isinstance(parse_channel_message(pose()), PoseMessage)


@pytest.mark.parametrize(
    "fields",
    [
        {"room": "../etc"},
        {"room": ""},
        {"room": "x" * 65},
        {"role": "admin"},
        {"name": "bell\x07"},
        {"name": "n" * 41},
        {"token": 5},
        {"token": "\ud800"},  # a lone surrogate: JSON allows the escape, UTF-8 cannot encode it
        {"name": "a\udfffb"},
        {"resume": "not-a-resume-token"},
    ],
)
def test_join_fields_are_checked(fields):
    with pytest.raises(InvalidFieldError):
        parse_signaling_message(json.dumps({"type": "join", "room": "demo", "role": "viewer", **fields}))


def test_offer_needs_a_session_description():
    with pytest.raises(InvalidFieldError):
        parse_signaling_message(json.dumps({"type": "offer", "to": "abc", "sdp": "hello"}))
    with pytest.raises(InvalidFieldError):
        parse_signaling_message(json.dumps({"type": "offer", "to": "a b", "sdp": "v=0"}))


def test_stamps_requests_take_a_boolean_only():
    assert parse_channel_message('{"type": "stamps", "on": true}') == StampsMessage(True)
    assert parse_channel_message('{"type": "stamps", "on": false}') == StampsMessage(False)
    for on in ("1", '"yes"', "null", "[true]"):
        with pytest.raises(InvalidFieldError):
            parse_channel_message('{"type": "stamps", "on": ' + on + "}")
    with pytest.raises(InvalidFieldError, match="missing field 'on'"):
        parse_channel_message('{"type": "stamps"}')


def test_a_memory_reset_is_a_bare_request_and_stats_carry_the_fill():
    assert parse_channel_message('{"type": "reset_memory"}') == ResetMemoryMessage()
    assert parse_channel_message(ResetMemoryMessage().to_json()) == ResetMemoryMessage()
    assert parse_channel_message('{"type": "reset_memory", "extra": 1}') == ResetMemoryMessage()  # unknown fields dropped
    with pytest.raises(MessageTooLargeError):
        parse_channel_message('{"type": "reset_memory", "pad": "' + "x" * CHANNEL_MAX_BYTES + '"}')
    stats = StatsMessage("ok", 25.0, {"avatar": 4.0}, 1, 0, 80.0, 0.42)
    assert json.loads(stats.to_json())["memory"] == 0.42 and parse_sender_message(stats.to_json()) == stats
    assert "memory" not in json.loads(StatsMessage("ok", 25.0, {}, 1, 0).to_json())  # memory off: no field
    compiling = StatsMessage("ok", 12.0, {}, 1, 0, kernels="compiling")
    assert json.loads(compiling.to_json())["kernels"] == "compiling" and parse_sender_message(compiling.to_json()) == compiling
    assert "kernels" not in json.loads(StatsMessage("ok", 25.0, {}, 1, 0).to_json())  # a CPU sender: no field


def test_hello_and_pong_carry_what_the_page_shows():
    hello = HelloMessage("alice", 256, "vp8", PoseLimits().to_json(), None, "cpu")
    assert json.loads(hello.to_json())["device"] == "cpu" and "refiner" not in json.loads(hello.to_json())
    assert parse_sender_message(hello.to_json()) == hello
    pong = PongMessage(12.5, 1.7e12)
    assert json.loads(pong.to_json()) == {"type": "pong", "t": 12.5, "wall_ms": 1.7e12}
    assert parse_sender_message(pong.to_json()) == pong


def test_outbound_messages_refuse_nan():
    with pytest.raises(ValueError):
        encode_message("stats", fps=float("nan"))


def test_camera_rate_carries_a_frame_rate_in_range():
    assert parse_call_message(CameraRateMessage(10.0).to_json()) == CameraRateMessage(10.0)
    for bad in ("10", True, 0.5, 500, float("nan")):
        with pytest.raises(InvalidFieldError, match="camera-rate: expected fps in 1..120"):
            CameraRateMessage(bad)
    with pytest.raises(MessageError):
        parse_call_message('{"type": "camera-rate", "fps": "fast"}')
