"""The allow-list, its host pins, the called AE titles and profiles, decided without a network peer."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from dicom_node.net.access import AccessPolicy, profile_for
from tests.conftest import make_settings

NOT_LISTED = "calling AE title not in network.allowed_calling_ae_titles"
WRONG_HOST = "calling AE title not allowed from this host"
NOT_OURS = "called AE title is not one of this node's AE titles"


def policy(tmp_path: Path, *entries: str, **overrides: object) -> AccessPolicy:
    return AccessPolicy.from_settings(make_settings(tmp_path, **{"network.allowed_calling_ae_titles": list(entries),
                                                                 **overrides}))


def test_an_unpinned_entry_accepts_its_ae_title_from_any_host(tmp_path: Path) -> None:
    access = policy(tmp_path, "SCANNER")
    assert access.check_calling("SCANNER", "10.0.0.1") is None
    assert access.check_calling("SCANNER", "::1") is None
    assert access.check_calling("OTHER", "10.0.0.1") == NOT_LISTED
    assert access.check_calling("scanner", "10.0.0.1") == NOT_LISTED   # AE titles are compared exactly
    assert access.callers == {"SCANNER": None} and not access.any_caller


def test_a_pinned_entry_accepts_only_its_host(tmp_path: Path) -> None:
    access = policy(tmp_path, "PINNED@10.11.12.13", "SCANNER")
    assert access.check_calling("PINNED", "10.11.12.13") is None
    assert access.check_calling("PINNED", "10.11.12.14") == WRONG_HOST
    assert access.check_calling("PINNED", "::ffff:10.11.12.13") is None        # IPv4-mapped IPv6 peer
    assert access.check_calling("PINNED", "::ffff:10.11.12.14") == WRONG_HOST
    assert access.check_calling("PINNED", "not an address") == WRONG_HOST
    assert access.check_calling("SCANNER", "10.11.12.14") is None
    assert access.callers["PINNED"] == frozenset({"10.11.12.13"})


def test_several_pins_of_one_ae_title_add_up(tmp_path: Path) -> None:
    access = policy(tmp_path, "PINNED@10.0.0.1", "PINNED@10.0.0.2")
    assert access.callers["PINNED"] == frozenset({"10.0.0.1", "10.0.0.2"})
    assert access.check_calling("PINNED", "10.0.0.2") is None
    assert access.check_calling("PINNED", "10.0.0.3") == WRONG_HOST


@pytest.mark.parametrize("entries", [("PINNED@10.0.0.1", "PINNED"), ("PINNED", "PINNED@10.0.0.1")])
def test_an_unpinned_entry_wins_over_a_pin_of_the_same_title(tmp_path: Path, entries: tuple[str, str]) -> None:
    access = policy(tmp_path, *entries)
    assert access.callers == {"PINNED": None}
    assert access.check_calling("PINNED", "192.168.1.1") is None


def test_ipv6_pins_are_compared_in_normal_form(tmp_path: Path) -> None:
    access = policy(tmp_path, "V6@0:0:0:0:0:0:0:1", "MAPPED@::ffff:10.1.2.3")
    assert access.callers["V6"] == frozenset({"::1"})
    assert access.check_calling("V6", "::1") is None
    assert access.check_calling("V6", "0000::0001") is None
    assert access.check_calling("V6", "::2") == WRONG_HOST
    assert access.callers["MAPPED"] == frozenset({"10.1.2.3"})    # an IPv4-mapped pin is the IPv4 peer
    assert access.check_calling("MAPPED", "10.1.2.3") is None
    assert access.check_calling("MAPPED", "::ffff:10.1.2.3") is None
    assert access.check_calling("MAPPED", "10.1.2.4") == WRONG_HOST


def test_a_host_name_pin_is_resolved_at_start_up(tmp_path: Path) -> None:
    access = policy(tmp_path, "LOCAL@localhost")
    hosts = access.callers["LOCAL"]
    assert hosts is not None and "127.0.0.1" in hosts
    assert access.check_calling("LOCAL", "127.0.0.1") is None
    assert access.check_calling("LOCAL", "10.0.0.1") == WRONG_HOST


def test_an_unresolvable_host_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"host 'no-such-host\.invalid' cannot be resolved"):
        policy(tmp_path, "GONE@no-such-host.invalid")


def test_a_star_accepts_any_caller_from_any_host(tmp_path: Path) -> None:
    access = policy(tmp_path, "*", "PINNED@10.0.0.1")
    assert access.any_caller
    assert access.check_calling("ANYONE", "203.0.113.9") is None
    assert access.check_calling("PINNED", "203.0.113.9") is None
    assert access.callers == {"PINNED": frozenset({"10.0.0.1"})}   # entries after the star are still read


def test_an_empty_allow_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^network\.allowed_calling_ae_titles is empty: list the AE titles "
                                          r"allowed to send, or '\*' to accept any caller \(insecure\)$"):
        policy(tmp_path)


def test_called_ae_titles_are_ours_and_our_profiles(tmp_path: Path) -> None:
    access = policy(tmp_path, "SCANNER", **{"network.ae_title": "AD_NODE", "network.profiles": [
        {"ae_title": "RESEARCH", "destinations": ["a"]}, {"ae_title": "TRIAL"}]})
    assert access.called == frozenset({"AD_NODE", "RESEARCH", "TRIAL"})
    assert access.check_called("AD_NODE") is None
    assert access.check_called("TRIAL") is None
    assert access.check_called("OTHER") == NOT_OURS
    assert access.check_called("ad_node") == NOT_OURS


def test_profile_for_picks_the_profile_of_the_called_title(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **{"network.profiles": [
        {"ae_title": "RESEARCH", "destinations": ["a"]}, {"ae_title": "TRIAL", "model_path": "/m"}]})
    research = profile_for(settings, "RESEARCH")
    assert research is not None and research.destinations == ("a",)
    trial = profile_for(settings, "TRIAL")
    assert trial is not None and trial.model_path == "/m"
    assert profile_for(settings, "AD_NODE") is None
    assert profile_for(settings, None) is None
