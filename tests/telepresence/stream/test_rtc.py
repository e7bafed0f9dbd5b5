"""WebRTC settings: explicit ICE server lists, codec order, encoder bitrate floor/start/ceiling."""

import pytest
from aiortc.codecs import h264, vpx

from telepresence.stream.rtc import BitrateConfig, IceConfig, apply_bitrate, video_codec_preferences


@pytest.fixture
def restore_bitrates():
    saved = [(m, m.MIN_BITRATE, m.DEFAULT_BITRATE, m.MAX_BITRATE) for m in (vpx, h264)]
    yield
    for module, low, start, high in saved:
        module.MIN_BITRATE, module.DEFAULT_BITRATE, module.MAX_BITRATE = low, start, high


@pytest.mark.parametrize("encoder_class", [vpx.Vp8Encoder, h264.H264Encoder])
def test_bitrate_floor_start_and_ceiling_reach_new_encoders(restore_bitrates, encoder_class):
    apply_bitrate(BitrateConfig(min_kbps=900, start_kbps=3000, max_kbps=7000))
    encoder = encoder_class()
    assert encoder.target_bitrate == 3_000_000
    encoder.target_bitrate = 100_000  # what a receiver's REMB estimate does
    assert encoder.target_bitrate == 900_000
    encoder.target_bitrate = 10**9
    assert encoder.target_bitrate == 7_000_000


def test_default_bitrates_suit_512_at_30_fps():
    config = BitrateConfig()
    assert config.min_kbps >= 500 and config.start_kbps >= 2000 and config.max_kbps >= 4000
    with pytest.raises(ValueError, match="min_kbps <= start_kbps"):
        BitrateConfig(min_kbps=3000, start_kbps=1000)


def test_ice_servers_default_to_an_explicit_empty_list():
    assert IceConfig().rtc_configuration().iceServers == []  # None would mean a public STUN server
    assert IceConfig().browser_ice_servers() == []


def test_turn_credentials_go_to_turn_urls_only():
    ice = IceConfig(("stun:stun.example.org:3478", "turn:turn.example.org:3478"), "user", "pass")
    servers = ice.rtc_configuration().iceServers
    assert (servers[0].username, servers[1].username, servers[1].credential) == (None, "user", "pass")
    assert ice.browser_ice_servers()[1] == {"urls": "turn:turn.example.org:3478", "username": "user", "credential": "pass"}
    with pytest.raises(ValueError, match="ICE server URL"):
        IceConfig(("http://example.org",))


def test_preferred_codec_comes_first_and_the_other_stays():
    assert video_codec_preferences("h264")[0].mimeType == "video/H264"
    mimes = [c.mimeType for c in video_codec_preferences("vp8")]
    assert mimes[0] == "video/VP8" and "video/H264" in mimes


def test_a_malformed_offer_is_named_without_the_parsers_exception_class():
    from telepresence.stream.rtc import InvalidOfferError, check_offer

    for sdp, said in (("v=0\r\nm=video\r\n", "malformed session description"),  # aiortc asserts, with no text
                      ("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:x\r\n",
                       "malformed session description: not enough values to unpack (expected 2, got 1)")):
        with pytest.raises(InvalidOfferError) as refused:
            check_offer(sdp)
        assert str(refused.value) == said
