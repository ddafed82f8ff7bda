"""What a series' content says about its completeness: spacing tolerances, small stacks, multi-frame instances."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from pydicom import Dataset

from dicom_node.ingest.completeness import Verdict, evaluate_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def slices(zs: Sequence[float], orientation: Sequence[float] = AXIAL, **extra: object) -> list[Dataset]:
    out = []
    for z in zs:
        ds = Dataset()
        ds.ImageOrientationPatient = list(orientation)
        in_plane_xy = orientation[2] == 0 and orientation[5] == 0
        ds.ImagePositionPatient = [0.0, 0.0, z] if in_plane_xy else [z, 0.0, 0.0]
        for keyword, value in extra.items():
            setattr(ds, keyword, value)
        out.append(ds)
    return out


@pytest.mark.parametrize(("zs", "reason"), [
    ([0, 2, 4, 6.19, 8.19], None),                       # within 10 % of the spacing
    ([0, 2, 4, 6.21, 8.21], "slice gap of 2.21 mm after slice 3 of 5 where the spacing is 2.00 mm (uneven spacing)"),
    ([0, 2, 4, 5.81, 7.81], None),
    ([0, 2, 4, 5.79, 7.79], "slice gap of 1.79 mm after slice 3 of 5 where the spacing is 2.00 mm (uneven spacing)"),
    ([0, 0.1, 0.2, 0.32, 0.42, 0.52], None),             # thin slices: at least 0.02 mm of tolerance
    ([0, 0.1, 0.2, 0.33, 0.43, 0.53],
     "slice gap of 0.13 mm after slice 3 of 6 where the spacing is 0.10 mm (uneven spacing)"),
    ([0, 2, 10], "slice gap of 2.00 mm after slice 1 of 3 where the spacing is 5.00 mm (uneven spacing)"),
    ([0, 10], None),                                     # two positions: no spacing to judge
    ([5.0], None),
    ([0, 2, 4, 10, 12, 14, 16], "slice gap of 6.00 mm after slice 3 of 7 where the spacing is 2.00 mm "
                                "(2 slice(s) missing)"),
])
def test_slice_spacing(zs: list[float], reason: str | None) -> None:
    verdict = evaluate_series(slices(zs))
    assert verdict == Verdict(reason is None, reason, None)


def test_positions_are_compared_to_a_hundredth_of_a_millimetre() -> None:
    assert evaluate_series(slices([0, 2, 4.004, 6, 8])).complete      # rounds to the same grid
    echoes = slices([0, 0.004, 2, 2.001, 4, 4.002])                  # two echoes per position, jittered
    assert evaluate_series(echoes).complete


def test_a_position_with_fewer_images_than_the_others_is_named() -> None:
    verdict = evaluate_series(slices([0, 0, 2, 2, 4]))
    assert verdict.reason == "3 slice positions with between 1 and 2 images each (images missing at some positions)"


def test_orientations_form_separate_stacks_and_unreadable_geometry_is_skipped() -> None:
    mixed = slices([0, 2, 4]) + slices([0, 2, 4], SAGITTAL)
    assert evaluate_series(mixed).complete
    assert not evaluate_series(slices([0, 2, 4]) + slices([0, 2, 9], SAGITTAL)).complete
    odd = slices([0, 2, 4, 6])
    odd[1].ImageOrientationPatient = [1, 0, 0, 0, 1]               # five values: not an orientation
    odd[2].ImagePositionPatient = [0, 0]                           # two values: not a position
    assert evaluate_series(odd).complete                           # 0 and 6 remain: too few to judge
    odd[3].ImagePositionPatient = [0, 0, 30]
    assert evaluate_series(odd + slices([9])).reason == (
        "slice gap of 9.00 mm after slice 1 of 3 where the spacing is 15.00 mm (uneven spacing)")
    text = slices([0, 2, 4, 16])
    text[3].ImagePositionPatient = 6.0                            # one number: not a position
    assert evaluate_series(text).complete


def test_images_in_acquisition_counts_each_acquisition() -> None:
    two = slices([0, 2, 4], ImagesInAcquisition=3, AcquisitionNumber=1) + \
        slices([0, 2, 4], ImagesInAcquisition=3, AcquisitionNumber=2)
    assert evaluate_series(two) == Verdict(True, None, 6)
    missing = two[:5]
    assert evaluate_series(missing) == Verdict(False, "5 of 6 images received (ImagesInAcquisition)", 6)
    disagreeing = slices([0, 2], ImagesInAcquisition=3) + slices([4], ImagesInAcquisition=4)
    assert evaluate_series(disagreeing) == Verdict(True, None, None)   # no one expected count
    empty = slices([0, 2, 4], ImagesInAcquisition="")
    assert evaluate_series(empty).expected_count is None


def multiframe(zs: Sequence[float], *, shared: Sequence[float] | None = AXIAL,
               per_frame: Sequence[Sequence[float] | None] | None = None, frames: int | None = None) -> Dataset:
    """An Enhanced MR instance: positions per frame, the orientation shared or per frame."""
    ds = Dataset()
    ds.NumberOfFrames = len(zs) if frames is None else frames
    if shared is not None:
        group = Dataset()
        orientation = Dataset()
        orientation.ImageOrientationPatient = list(shared)
        group.PlaneOrientationSequence = [orientation]
        ds.SharedFunctionalGroupsSequence = [group]
    items = []
    for n, z in enumerate(zs):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [0.0, 0.0, z]
        item.PlanePositionSequence = [position]
        if per_frame is not None and per_frame[n] is not None:
            own = Dataset()
            own.ImageOrientationPatient = list(per_frame[n])  # type: ignore[arg-type]
            item.PlaneOrientationSequence = [own]
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = items
    return ds


def test_a_multiframe_instance_is_judged_by_its_frames() -> None:
    assert evaluate_series([multiframe([0, 2, 4, 6, 8])]) == Verdict(True, None, None)
    gap = evaluate_series([multiframe([0, 2, 4, 8, 10])])
    assert gap.reason == "slice gap of 4.00 mm after slice 3 of 5 where the spacing is 2.00 mm (1 slice(s) missing)"
    counted = evaluate_series([multiframe([0, 2, 4], frames=3)], )
    assert counted.complete
    short = [multiframe([0, 2, 4])]
    short[0].ImagesInAcquisition = 5
    assert evaluate_series(short).reason == "3 of 5 images received (ImagesInAcquisition)"


def test_a_multiframe_instance_declaring_more_frames_than_it_describes_is_incomplete() -> None:
    verdict = evaluate_series([multiframe([0, 2, 4], frames=4)])
    assert verdict == Verdict(False, "a multi-frame instance declares 4 frames but describes 3", None)
    assert evaluate_series([multiframe([0, 2, 4], frames=None)]).complete


def test_per_frame_orientations_override_the_shared_one() -> None:
    # frames 0-2 axial (shared), frames 3-5 sagittal of their own: two stacks, each evenly spaced on its normal
    frames = multiframe([0, 2, 4, 0, 2, 9], per_frame=[None, None, None, SAGITTAL, SAGITTAL, SAGITTAL])
    for item in frames.PerFrameFunctionalGroupsSequence[3:]:
        z = item.PlanePositionSequence[0].ImagePositionPatient[2]
        item.PlanePositionSequence[0].ImagePositionPatient = [z, 0.0, 0.0]
    verdict = evaluate_series([frames])
    assert verdict.reason == ("slice gap of 7.00 mm after slice 1 of 3 where the spacing is 4.50 mm "
                              "(1 slice(s) missing)")
    own_only = multiframe([0, 2, 4, 7, 9], shared=None, per_frame=[AXIAL] * 5)
    assert own_only.get("SharedFunctionalGroupsSequence") is None
    assert "slice gap of 3.00 mm after slice 3 of 5" in (evaluate_series([own_only]).reason or "")


def test_frames_without_geometry_count_but_are_not_placed() -> None:
    frames = multiframe([0, 2, 4, 6])
    del frames.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence
    assert evaluate_series([frames]).complete                     # 0, 2, 4 placed; the fourth frame is not
    frames.ImagesInAcquisition = 4
    assert evaluate_series([frames]) == Verdict(True, None, 4)     # the frame without a position still counts
    no_orientation = multiframe([0, 2, 9], shared=None)
    assert evaluate_series([no_orientation]).complete             # nothing to place without an orientation


def test_a_single_frame_instance_may_state_one_frame() -> None:
    assert evaluate_series(slices([0, 2, 4], NumberOfFrames=1)).complete
    assert evaluate_series(slices([0, 2, 4], NumberOfFrames="")).complete


def test_an_empty_frame_count_of_a_multiframe_instance_is_not_checked() -> None:
    frames = multiframe([0, 2, 4])
    frames.NumberOfFrames = ""
    assert evaluate_series([frames]) == Verdict(True, None, None)


def test_a_content_gap_keeps_the_expected_count() -> None:
    gapped = slices([0, 2, 4, 8, 10], ImagesInAcquisition=5)
    assert evaluate_series(gapped) == Verdict(
        False, "slice gap of 4.00 mm after slice 3 of 5 where the spacing is 2.00 mm (1 slice(s) missing)", 5)


def test_slightly_tilted_stacks_are_told_apart_at_a_thousandth() -> None:
    tilted = (0.9998, 0.02, 0.0, -0.02, 0.9998, 0.0)         # another stack, tilted by about one degree
    two = slices([0, 2, 4]) + slices([0.5, 2.5, 4.5], tilted)
    assert evaluate_series(two).complete                     # each stack is evenly spaced
    jitter = (1.0, 0.0004, 0.0, -0.0004, 1.0, 0.0)           # the same plane, written with rounding noise
    one = slices([0, 2, 10]) + slices([4, 6, 8], jitter)
    assert evaluate_series(one).complete                     # one stack, 0 to 10 mm every 2 mm
