"""The ``kvzip-rag`` CLI end to end on a tiny random-weight model saved to a folder (``--model DIR``):
index (txt, md, html, pdf), ask, chat, ls, rm, inspect (real PNG + HTML), and clear errors with non-zero exits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvzip_rag.cli import app

HARBOUR = (
    "The harbour of Velmora was built in 1731 by the engineer Ansel Brask. It has two breakwaters, the northern one "
    "made of granite and the southern one of basalt. Ferries leave for the island of Tessin every morning at seven."
)
LIGHTHOUSE = (
    "# The lighthouse\n\nThe lighthouse at the end of the northern breakwater is painted red and white, and its lamp "
    "can be seen from eighteen nautical miles away. Its keeper, Ida Holm, wrote a ledger every night."
)
REGATTA_HTML = (
    "<html><head><title>Regatta</title><style>p {color: red}</style><script>var x = 1;</script></head><body>"
    "<h1>The regatta</h1><p>Every August the town holds a regatta in which fishing boats race around the harbour."
    "</p><p>The winner receives a silver anchor.</p></body></html>"
)


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF with one line of Helvetica text (pypdf extracts it)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> "
         b"/Contents 5 0 R >>"),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# Rich tables fit their cells on one line; the user's own settings never leak into a test.
WIDE = {"COLUMNS": "200", **{f"KVZIP_RAG_{name}": None for name in
                             ("STORE", "DB", "MODEL", "RATIO", "LEVEL", "DEVICE", "THREADS")}}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer random LlamaForCausalLM with the real SmolLM2 tokenizer, saved like any model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "harbour.txt").write_text(HARBOUR)
    (folder / "lighthouse.md").write_text(LIGHTHOUSE)
    (folder / "sub" / "regatta.html").write_text(REGATTA_HTML)
    (folder / "data.csv").write_text("a,b\n1,2\n")  # unsupported: skipped with a note
    return folder


@pytest.fixture()
def cli(tmp_path, tiny_model_dir):
    """Run the CLI with a temp store and the tiny model; returns the click Result."""
    runner = CliRunner(env=WIDE)
    store = tmp_path / "store"

    def run(*args: str, input: str | None = None, global_options: bool = True):
        options = ["--store", str(store), "--model", str(tiny_model_dir)] if global_options else []
        result = runner.invoke(app, [*options, *args], input=input)
        assert "Traceback" not in result.output, result.output
        return result

    run.store = store
    run.model = tiny_model_dir
    return run


def test_index_ask_ls_inspect_rm(cli, docs, tmp_path):
    result = cli("index", str(docs))
    assert result.exit_code == 0, result.output
    for doc_id in ("harbour.txt", "lighthouse.md", "sub/regatta.html"):
        assert doc_id in result.stdout
    assert "skipping" in result.stderr and "data.csv" in result.stderr

    listing = cli("ls")
    assert listing.exit_code == 0, listing.output
    for doc_id in ("harbour.txt", "lighthouse.md", "sub/regatta.html"):
        assert doc_id in listing.stdout
    assert "0.3 pair" in listing.stdout and "full bytes" in listing.stdout

    # Re-indexing the same files reuses the stored caches.
    again = cli("index", str(docs / "harbour.txt"))
    assert again.exit_code == 0 and "reused" in again.stdout

    answer = cli("ask", "Who built the harbour of Velmora?", "--max-tokens", "6")
    assert answer.exit_code == 0, answer.output
    assert "sources" in answer.stderr and "harbour.txt" in answer.stderr
    assert "first token" in answer.stderr and "tok/s" in answer.stderr and "cache load" in answer.stderr
    assert "ratio 0.3" in answer.stderr and "smaller" in answer.stderr

    # A lower ratio than stored loads fewer entries (a prefix of each head).
    lower = cli("ask", "Who built the harbour of Velmora?", "--max-tokens", "4", "--ratio", "0.1")
    assert lower.exit_code == 0, lower.output
    assert "ratio 0.1" in lower.stderr

    out = tmp_path / "pictures"
    inspected = cli("inspect", "sub/regatta.html", "--out", str(out))
    assert inspected.exit_code == 0, inspected.output
    pngs, pages = list(out.glob("*.png")), list(out.glob("*.html"))
    assert len(pngs) == 1 and len(pages) == 1
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pngs[0].stat().st_size > 5000
    page = pages[0].read_text()
    assert page.count('<span style="background:rgb(') > 20
    assert "silver anchor" in page.replace("</span><span", "").replace("\n", " ") or "anchor" in page
    assert "<script>" not in page  # HTML in the document is escaped / stripped

    removed = cli("rm", "harbour.txt", "lighthouse.md")
    assert removed.exit_code == 0, removed.output
    listing = cli("ls")
    assert "harbour.txt" not in listing.stdout and "sub/regatta.html" in listing.stdout


def test_chat_follow_ups_and_reset(cli, docs):
    assert cli("index", str(docs)).exit_code == 0
    result = cli("chat", "--max-tokens", "5",
                 input="Who built the harbour?\nWhen did ferries leave?\nWhat does the winner receive?\n"
                       "xylophone quantum zebra\n/reset\nWhat does the winner receive?\nexit\nnever asked\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("kvzip>") == 5
    err = result.stderr
    assert "talking about harbour.txt" in err and "turn 2 · from harbour.txt" in err  # the follow-up stayed
    # another topic: its document joins the conversation, every footer names the documents the answer used
    assert "now talking about sub/regatta.html, harbour.txt" in err
    assert "turn 3 · from sub/regatta.html, harbour.txt" in err
    assert "turn 4 · from sub/regatta.html, harbour.txt" in err  # matches no word: stays with those documents
    assert "conversation reset" in err and err.count("talking about sub/regatta.html ·") == 1
    assert "never asked" not in result.stdout
    # End of input also ends the loop.
    eof = cli("chat", "--doc", "harbour.txt", "--max-tokens", "3", input="Who built it?\n")
    assert eof.exit_code == 0, eof.output
    assert "talking about harbour.txt" in eof.stderr


def test_options_after_the_command_and_env_vars(tmp_path, tiny_model_dir, docs):
    runner = CliRunner(env=WIDE)
    store = tmp_path / "env-store"
    env = {**WIDE, "KVZIP_RAG_STORE": str(store), "KVZIP_RAG_MODEL": str(tiny_model_dir), "KVZIP_RAG_RATIO": "0.5"}
    result = runner.invoke(app, ["index", str(docs / "harbour.txt")], env=env)
    assert result.exit_code == 0, result.output
    assert (store / "index.sqlite").exists()
    listing = runner.invoke(app, ["ls", "--store", str(store)])
    assert "0.5 pair" in listing.stdout
    other = tmp_path / "other-store"
    result = runner.invoke(app, ["index", str(docs / "lighthouse.md"), "--store", str(other), "--model",
                                 str(tiny_model_dir), "--ratio", "0.2", "--level", "uniform", "--id", "light"])
    assert result.exit_code == 0, result.output
    listing = runner.invoke(app, ["ls"], env={**WIDE, "KVZIP_RAG_STORE": str(other)})
    assert "light" in listing.stdout and "0.2 uniform" in listing.stdout


def test_db_url_option(tmp_path, tiny_model_dir, docs):
    runner = CliRunner(env=WIDE)
    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"
    options = ["--db", url, "--store", str(tmp_path / "blob-home"), "--model", str(tiny_model_dir)]
    assert runner.invoke(app, [*options, "index", str(docs / "harbour.txt")]).exit_code == 0
    assert (tmp_path / "elsewhere.sqlite").exists() and list((tmp_path / "blob-home" / "blobs").rglob("*.safetensors"))
    assert "harbour.txt" in runner.invoke(app, ["--db", url, "--store", str(tmp_path / "blob-home"), "ls"]).stdout


def test_pdf_is_read(cli, tmp_path):
    pdf = tmp_path / "notice.pdf"
    pdf.write_bytes(minimal_pdf("The ferry to Tessin leaves every morning at seven."))
    from kvzip_rag.cli import extract_text

    assert "ferry to Tessin" in extract_text(pdf)
    result = cli("index", str(pdf))
    assert result.exit_code == 0, result.output
    assert "notice.pdf" in cli("ls").stdout


def test_clear_errors_and_exit_codes(cli, tmp_path, docs):
    def error_of(*args, input=None):
        result = cli(*args, input=input)
        assert result.exit_code != 0, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return result.exit_code, lines[-1] if lines else ""

    code, line = error_of("index", str(tmp_path / "missing"))
    assert code == 1 and line.startswith("error:") and "no such file or folder" in line and "missing" in line

    (tmp_path / "empty").mkdir()
    code, line = error_of("index", str(tmp_path / "empty"))
    assert code == 1 and "holds no" in line and "nothing to index" in line

    only_csv = tmp_path / "csv"
    only_csv.mkdir()
    (only_csv / "table.csv").write_text("x")
    assert "nothing to index" in error_of("index", str(only_csv))[1]

    blank = tmp_path / "blank.txt"
    blank.write_text("   \n\n ")
    assert "no text" in error_of("index", str(blank))[1]

    # An empty store: ask, chat, ls say so.
    code, line = error_of("ask", "Anything?")
    assert "holds no documents" in line and "kvzip-rag index" in line
    assert "empty" in cli("ls").stdout

    assert cli("index", str(docs)).exit_code == 0
    for command in (["rm", "nope"], ["inspect", "nope", "--out", str(tmp_path / "o")], ["ask", "x?", "--doc", "nope"],
                    ["chat", "--doc", "nope"]):
        code, line = error_of(*command)
        assert code == 1 and "no document 'nope'" in line, (command, line)
    # rm with one unknown id removes nothing.
    error_of("rm", "harbour.txt", "nope")
    assert "harbour.txt" in cli("ls").stdout

    assert "no indexed document matches" in error_of("ask", "zzzqx wwwvy?")[1]
    assert "question is empty" in error_of("ask", "  ")[1]
    assert "--id names one document" in error_of("index", str(docs), "--id", "x")[1]

    # Bad option values are usage errors (exit code 2) with the reason.
    result = cli("ask", "x?", "--ratio", "1.5")
    assert result.exit_code == 2 and "(0, 1]" in result.output
    result = cli("index", str(docs), "--level", "diagonal")
    assert result.exit_code == 2 and "pair" in result.output

    # A model that does not exist: a KVzipError, no traceback (over a store with documents: an empty store is
    # refused before the model loads).
    result = cli("--store", str(cli.store), "--model", str(tmp_path / "no-model-here"), "ask", "x?",
                 global_options=False)
    assert result.exit_code == 1 and "could not load model" in result.stderr


def test_help_and_bench_passthrough(cli):
    result = cli("--help", global_options=False)
    assert result.exit_code == 0
    for command in ("index", "ask", "chat", "ls", "rm", "inspect", "demo", "bench"):
        assert command in result.stdout
    bench = cli("bench", "--help", global_options=False)
    assert bench.exit_code == 0, bench.output
    assert "--quick" in bench.stdout


def test_long_file_is_segmented_and_inspected(cli, tmp_path):
    long = tmp_path / "long.txt"
    paragraphs = [f"Paragraph {i}: the ferry number {i} leaves the harbour of Velmora at {i % 12 + 1} o'clock and "
                  f"carries {i * 7} passengers to the island of Tessin, where the lighthouse keeper counts them."
                  for i in range(120)]
    long.write_text("\n\n".join(paragraphs))  # ~4,000 tokens: more than one window of the tiny model
    result = cli("index", str(long))
    assert result.exit_code == 0, result.output
    row = next(line for line in cli("ls").stdout.splitlines() if "long.txt" in line)
    segments = int(row.split("│")[2])
    assert segments >= 2, row
    out = tmp_path / "pictures"
    assert cli("inspect", "long.txt", "--out", str(out)).exit_code == 0
    page = (out / "long.txt.tokens.html").read_text()
    assert all(f"segment {i}" in page for i in range(segments))
    answer = cli("ask", "How many passengers does ferry number 100 carry?", "--max-tokens", "3")
    assert answer.exit_code == 0 and "long.txt segment" in answer.stderr


def test_doc_option_answers_without_a_matching_word_and_chat_window(cli, docs):
    assert cli("index", str(docs)).exit_code == 0
    result = cli("ask", "zzzqx?", "--doc", "harbour.txt", "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    assert "harbour.txt segment 0 (no word of the question matched" in result.stderr
    # Many long turns: the conversation starts over instead of running past the model's positions.
    turns = "".join(f"Tell me about the harbour of Velmora, turn {i}.\n" for i in range(16))
    chat = cli("chat", "--doc", "harbour.txt", "--max-tokens", "400", input=turns)
    assert chat.exit_code == 0, chat.output
    assert "filled the model's window" in chat.stderr


def test_demo_on_a_small_folder(cli, tmp_path):
    folder = tmp_path / "sample"
    folder.mkdir()
    (folder / "harbour.txt").write_text(HARBOUR)
    (folder / "questions.json").write_text(
        '[{"document": "harbour.txt", "question": "Who built the harbour of Velmora?", "answer": "Ansel Brask", '
        '"accept": ["Brask"]}]'
    )
    result = cli("demo", "--docs", str(folder), "--max-tokens", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Q1. Who built the harbour of Velmora?" in out and "expected: Ansel Brask" in out
    row = next(line for line in out.splitlines() if "questions routed to the right document" in line)
    assert "1/1" in row
    assert "re-reading the document instead" in out and "smaller" in out
    again = cli("demo", "--docs", str(folder), "--max-tokens", "2")
    assert again.exit_code == 0 and "reused" in again.stdout
    (tmp_path / "no-questions").mkdir()
    missing = cli("demo", "--docs", str(tmp_path / "no-questions"))
    assert missing.exit_code == 1 and "questions.json" in missing.stderr


def test_one_bad_file_does_not_stop_the_others_and_force_replaces(cli, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (folder / "harbour.txt").write_text(HARBOUR)
    result = cli("index", str(folder))
    assert result.exit_code == 1, result.output
    assert "broken.pdf" in result.stderr and "1 file(s) could not be indexed" in result.stderr
    assert "harbour.txt" in cli("ls").stdout  # the good file was indexed anyway

    (folder / "broken.pdf").unlink()
    (folder / "harbour.txt").write_text(HARBOUR + " A second lighthouse was built in 1802.")
    changed = cli("index", str(folder))
    assert changed.exit_code == 1 and "already stored with other text; pass --force" in changed.stderr
    forced = cli("index", str(folder), "--force")
    assert forced.exit_code == 0, forced.output
    assert "reused" not in forced.stdout
