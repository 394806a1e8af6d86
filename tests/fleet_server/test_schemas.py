"""The API's response schemas read the services' records as they are (``from_attributes``):
what a record computes (a bundle's URL, a dead letter's prefix) and what a route joins to it
(a device's desired state, a group's members) reach the JSON."""

from __future__ import annotations

import pytest

from edgefleet.contract.messages import BundleRef
from fleet_server.api.schemas import (
    BundleDetail,
    DeadLetterPublic,
    DeviceDetail,
    GroupPublic,
    Joined,
)
from fleet_server.models import BundleRecord, DeadLetter, DesiredRecord, Device, Group

REF = BundleRef("churn", "1.0.0", "a" * 64, "/api/v1/bundles/churn/1.0.0/download", 10)


def test_a_bundle_reads_with_its_download_url_and_manifest():
    record = BundleRecord(1, "churn", "1.0.0", "a" * 64, 10, "b" * 64, 5.0, "ops",
                          ({"keyid": "k1", "role": "build", "name": "ci"},), {"name": "churn"})
    out = BundleDetail.model_validate(record).model_dump()
    assert out["url"] == "/api/v1/bundles/churn/1.0.0/download"
    assert out["signers"] == [{"keyid": "k1", "role": "build", "name": "ci"}]
    assert out["manifest"] == {"name": "churn"}


def test_a_dead_letter_shows_a_bounded_hex_prefix_never_the_payload():
    letter = DeadLetter(1, 2.0, "edgefleet/v1/devices/d1/summary", "d1", "SchemaError",
                        "bad", 300, b"\x01" * 300)
    out = DeadLetterPublic.model_validate(letter).model_dump()
    assert out["payload_prefix"] == "01" * 256
    assert "payload" not in out


def test_a_detail_schema_reads_the_record_and_what_the_route_joins():
    device = Device("d1", {"site": "a"}, {}, {"site": "a"}, 1.0, bundle=REF)
    desired = DesiredRecord("d1", 3, REF, None, False, 9.0, "ops")
    out = DeviceDetail.model_validate(Joined(device, desired=desired, reports=[])).model_dump()
    assert out["id"] == "d1" and out["bundle"]["version"] == "1.0.0"
    assert out["desired"]["revision"] == 3 and out["reports"] == []
    group = Group("line-3", {"line": "3"}, important_features=("humidity",))
    assert GroupPublic.model_validate(Joined(group, members=4)).model_dump()["members"] == 4


def test_joined_answers_only_its_own_names_and_the_records():
    view = Joined(Group("g", {}), members=1)
    assert view.members == 1 and view.name == "g"
    with pytest.raises(AttributeError):
        view.nothing  # noqa: B018
