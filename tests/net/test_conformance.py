"""docs/conformance.md against a running node: the statement is the expectation, the node the actual.

The marked tables of the conformance statement (``<!-- conformance: NAME -->``) are parsed and compared with
what the node negotiates on 127.0.0.1: every (abstract syntax, transfer syntax) pair the Storage SCP accepts,
the SOP classes it rejects, its implementation identifying information, the C-STORE outcome of an analysed and
of a refused SOP class, and the presentation contexts the node's SCU proposes when it sends its SR, its PDF and
a C-ECHO.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, AllTransferSyntaxes, generate_uid
from pynetdicom import AE, evt

from dicom_node.db.session import open_database
from dicom_node.ingest.recorder import Recorder
from dicom_node.ingest.spool import Spool
from dicom_node.net.requestor import associate
from dicom_node.net.scp import StorageServer
from dicom_node.net.scu import echo, send_file
from dicom_node.settings import Destination, Settings
from tests.conftest import make_settings
from tests.support.instances import pydicom_test_file

DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"
#: Presentation context IDs are odd numbers 1-255: at most 128 contexts in one A-ASSOCIATE-RQ.
MAX_CONTEXTS = 128
#: The result of a presentation context rejected as "abstract syntax not supported" (PS3.8 9.3.3.2).
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03

_MARKER = re.compile(r"^<!-- conformance: ([a-z-]+) -->$")

Pair = tuple[str, str]


# ----- the document --------------------------------------------------------
def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def read_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The rows of every marked table of *text*, keyed by marker (tables sharing a marker are joined).

    Parameters
    ----------
    text : str
        Markdown with tables each preceded by ``<!-- conformance: NAME -->``.

    Returns
    -------
    dict of str to list of dict
        For each marker, its rows as ``{column header: cell}``.
    """
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = _MARKER.match(line.strip())
        if match is None:
            continue
        header = _cells(lines[index + 1])
        assert set(lines[index + 2].replace("|", "").strip()) <= {"-", " "}, f"no table after {line}"
        rows = tables.setdefault(match.group(1), [])
        for row in lines[index + 3:]:
            if not row.startswith("|"):
                break
            cells = _cells(row)
            assert len(cells) == len(header), f"{match.group(1)}: {row}"
            rows.append(dict(zip(header, cells, strict=True)))
    return tables


def uid_named(name: str, uid: str) -> str:
    """*uid*, checked to be the UID pydicom calls *name*."""
    assert UID(uid).name == name, f"{uid} is {UID(uid).name!r} in pydicom, the statement says {name!r}"
    return uid


def _transfer_syntax_uid(name: str) -> str:
    matches = [uid for uid in ALL_SYNTAXES if UID(uid).name == name]
    assert len(matches) == 1, f"transfer syntax {name!r} is not a pydicom UID name"
    return matches[0]


@dataclass(frozen=True)
class Statement:
    """What docs/conformance.md says, as UIDs."""

    tables: dict[str, list[dict[str, str]]]

    def groups(self, accept_lossy: bool) -> dict[str, list[str]]:
        """Transfer syntax group -> UIDs negotiated with *accept_lossy*."""
        groups: dict[str, list[str]] = {}
        for row in self.tables["transfer-syntax-groups"]:
            members = groups.setdefault(row["Group"], [])
            uid = uid_named(row["Transfer Syntax"], row["UID"])
            if row["Negotiated"] == "always" or (accept_lossy and "storage.accept_lossy = true" in row["Negotiated"]):
                members.append(uid)
            else:
                assert "storage.accept_lossy = true" in row["Negotiated"], row
        return groups

    def accepted(self, accept_lossy: bool = True) -> set[Pair]:
        """The (abstract syntax, transfer syntax) pairs the Storage SCP accepts."""
        groups = self.groups(accept_lossy)
        pairs: set[Pair] = set()
        for row in self.tables["accepted-contexts"]:
            assert row["Role"] == "SCP" and row["Extended Negotiation"] == "None", row
            abstract = uid_named(row["Abstract Syntax"], row["UID"])
            for group in row["Transfer Syntaxes"].split(", "):
                pairs |= {(abstract, ts) for ts in groups[group]}
        return pairs

    def abstract_syntaxes(self) -> set[str]:
        """Every abstract syntax of the accepted-contexts tables."""
        rows = self.tables["accepted-contexts"]
        uids = [uid_named(row["Abstract Syntax"], row["UID"]) for row in rows]
        assert len(uids) == len(set(uids)), "an abstract syntax listed twice"
        return set(uids)

    def not_supported(self) -> list[str]:
        """The SOP classes the statement names as not supported."""
        return [uid_named(row["Abstract Syntax"], row["UID"]) for row in self.tables["not-supported"]]

    def outcome(self, abstract: str) -> str:
        """The "C-STORE outcome" cell of *abstract*."""
        return next(row["C-STORE outcome"] for row in self.tables["accepted-contexts"] if row["UID"] == abstract)

    def association(self, name: str) -> dict[str, str]:
        """A "Parameter | Value" table as a dict."""
        return {row["Parameter"]: row["Value"] for row in self.tables[name]}

    def proposed(self) -> set[tuple[str, tuple[str, ...]]]:
        """The SCU's proposed contexts: (abstract syntax, transfer syntaxes in order)."""
        contexts = set()
        for row in self.tables["proposed-contexts"]:
            assert row["Role"] == "SCU" and row["Extended Negotiation"] == "None", row
            syntaxes = tuple(_transfer_syntax_uid(name) for name in row["Transfer Syntaxes"].split(", "))
            contexts.add((uid_named(row["Abstract Syntax"], row["UID"]), syntaxes))
        return contexts


#: Every transfer syntax pydicom or pynetdicom knows.
ALL_SYNTAXES: tuple[str, ...] = tuple(dict.fromkeys([*AllTransferSyntaxes, *pynetdicom.ALL_TRANSFER_SYNTAXES]))


@pytest.fixture(scope="module")
def statement() -> Statement:
    return Statement(read_tables(DOC.read_text(encoding="utf-8")))


# ----- the node ------------------------------------------------------------
def start_node(directory: Path, **overrides: object) -> StorageServer:
    """The node's Storage SCP on 127.0.0.1 and a free port, with its own spool and SQLite database."""
    settings: Settings = make_settings(directory, **overrides)
    database = open_database(settings.database_url)
    server = StorageServer(settings, Spool(settings.spool_dir), Recorder(database.sessions))
    server.start()
    return server


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageServer]:
    server = start_node(tmp_path_factory.mktemp("conformance"))
    yield server
    server.stop()


def _chunks(pairs: list[Pair]) -> Iterable[list[Pair]]:
    for start in range(0, len(pairs), MAX_CONTEXTS):
        yield pairs[start:start + MAX_CONTEXTS]


def negotiate(port: int, pairs: Iterable[Pair]) -> tuple[set[Pair], dict[Pair, int]]:
    """Propose each pair as a context of its own (128 per association); the accepted pairs and the others' results."""
    accepted: set[Pair] = set()
    rejected: dict[Pair, int] = {}
    for chunk in _chunks(sorted(set(pairs))):
        ae = AE(ae_title="SCANNER")
        for abstract, syntax in chunk:
            ae.add_requested_context(abstract, syntax)
        assoc = associate(ae, "127.0.0.1", port, ae_title="AD_NODE")
        try:
            # An A-ASSOCIATE-AC accepting no context is aborted by pynetdicom's requestor: its results stand.
            assert assoc.is_established or assoc.rejected_contexts, "no A-ASSOCIATE-AC"
            accepted |= {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            for cx in assoc.rejected_contexts:
                assert cx.result is not None
                rejected[(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))] = int(cx.result)
        finally:
            if assoc.is_established:
                assoc.release()
    return accepted, rejected


def _diff(expected: set[Pair], actual: set[Pair]) -> str:
    def names(pairs: set[Pair]) -> list[str]:
        return sorted(f"{UID(a).name} / {UID(t).name}" for a, t in pairs)
    return f"in the statement only: {names(expected - actual)}; negotiated only: {names(actual - expected)}"


def test_accepted_contexts_are_exactly_the_statements(node: StorageServer, statement: Statement) -> None:
    supported = {str(cx.abstract_syntax) for cx in node.ae.supported_contexts}
    abstracts = supported | statement.abstract_syntaxes()
    syntaxes = set(ALL_SYNTAXES) | {ts for _, ts in statement.accepted()}
    accepted, rejected = negotiate(node.port, [(a, t) for a in abstracts for t in syntaxes])

    expected = statement.accepted()
    assert accepted == expected, _diff(expected, accepted)
    assert rejected.keys() == {(a, t) for a in abstracts for t in syntaxes} - expected


def test_without_lossy_input_only_the_always_groups_are_negotiated(
        tmp_path: Path, statement: Statement) -> None:
    server = start_node(tmp_path, **{"storage.accept_lossy": False})
    try:
        abstracts = {pydicom.uid.MRImageStorage, pydicom.uid.EnhancedMRImageStorage, pydicom.uid.CTImageStorage,
                     "1.2.840.10008.1.1"}
        accepted, _ = negotiate(server.port, [(a, t) for a in abstracts for t in ALL_SYNTAXES])
    finally:
        server.stop()
    expected = {pair for pair in statement.accepted(accept_lossy=False) if pair[0] in abstracts}
    assert accepted == expected, _diff(expected, accepted)
    assert expected < {pair for pair in statement.accepted() if pair[0] in abstracts}


def test_sop_classes_not_supported_are_rejected(node: StorageServer, statement: Statement) -> None:
    refused = statement.not_supported()
    assert refused, "the statement lists no unsupported SOP class"
    assert not set(refused) & statement.abstract_syntaxes()
    accepted, rejected = negotiate(node.port, [(uid, pydicom.uid.ExplicitVRLittleEndian) for uid in refused])

    assert not accepted, _diff(set(), accepted)
    assert set(rejected.values()) == {ABSTRACT_SYNTAX_NOT_SUPPORTED}


def test_association_parameters_are_the_statements(node: StorageServer, statement: Statement) -> None:
    expected = statement.association("scp-association")
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = associate(ae, "127.0.0.1", node.port, ae_title="AD_NODE")
    try:
        assert assoc.is_established
        acceptor = assoc.acceptor
        assert acceptor.primitive is not None
        actual = {
            "Application Context Name": str(acceptor.primitive.application_context_name),
            "Maximum PDU size received": str(acceptor.maximum_length),
            "Implementation Class UID": str(acceptor.implementation_class_uid),
            "Implementation Version Name": str(acceptor.implementation_version_name),
        }
        assert int(assoc.send_c_echo().Status) == 0x0000
    finally:
        assoc.release()
    assert actual == expected


def _instance(name: str) -> Dataset:
    ds = dcmread(pydicom_test_file(name))
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = ds.StudyInstanceUID = generate_uid()
    return ds


def test_c_store_outcome_column(node: StorageServer, statement: Statement) -> None:
    analysed, other = _instance("MR_small.dcm"), _instance("CT_small.dcm")
    assert statement.outcome(analysed.SOPClassUID).startswith("stored")
    assert statement.outcome(other.SOPClassUID) == "refused 0x0122"
    ae = AE(ae_title="SCANNER")
    for ds in (analysed, other):
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = associate(ae, "127.0.0.1", node.port, ae_title="AD_NODE")
    try:
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (analysed, other)]
    finally:
        assoc.release()
    assert statuses == [0x0000, 0x0122]


# ----- the SCU -------------------------------------------------------------
@dataclass
class Capture:
    """A pynetdicom SCP recording what each requestor proposed."""

    port: int
    requests: list[Any]


@pytest.fixture(scope="module")
def capture(statement: Statement) -> Iterator[Capture]:
    requests: list[Any] = []

    def on_requested(event: Any) -> None:
        requests.append(event.assoc.requestor)

    ae = AE(ae_title="CAPTURE")
    for abstract, syntaxes in statement.proposed():
        ae.add_supported_context(abstract, list(syntaxes))
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, lambda event: 0x0000),
        (evt.EVT_C_ECHO, lambda event: 0x0000)])
    assert server is not None
    yield Capture(int(server.server_address[1]), requests)
    ae.shutdown()


def written_objects(directory: Path) -> list[Path]:
    """The SR and the PDF of a run, written as the node writes them (``save_as(enforce_file_format=True)``)."""
    from tests.support.sr import build as build_sr_object
    from tests.support.sr import build_pdf_object, make_mr_series, make_report

    sources = make_mr_series()
    paths = []
    for kind, ds in (("sr", build_sr_object(sources, make_report())), ("pdf", build_pdf_object(sources))):
        path = directory / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_scu_proposes_the_statements_contexts(capture: Capture, statement: Statement, tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    destination = Destination(name="capture", ae_title="CAPTURE", host="127.0.0.1", port=capture.port)
    results = [send_file(path, destination, settings) for path in written_objects(tmp_path)]
    results.append(echo(destination, settings))
    assert [result.status for result in results] == [0x0000, 0x0000, 0x0000], results

    proposed = set()
    for requestor in capture.requests:
        contexts = requestor.requested_contexts
        assert len(contexts) == 1, "one presentation context per association"
        proposed.add((str(contexts[0].abstract_syntax), tuple(str(ts) for ts in contexts[0].transfer_syntax)))
        assert requestor.role_selection == {} and requestor.asynchronous_operations == (1, 1)
        assert {
            "Application Context Name": str(requestor.primitive.application_context_name),
            "Maximum PDU size received": str(requestor.maximum_length),
            "Implementation Class UID": str(requestor.implementation_class_uid),
            "Implementation Version Name": str(requestor.implementation_version_name),
        } == statement.association("scu-association")
    assert proposed == statement.proposed()
