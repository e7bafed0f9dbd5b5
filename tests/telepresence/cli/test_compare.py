"""`telepresence compare` on results.json files shaped as `telepresence eval` writes them."""
import json

from telepresence.cli import main as cli_main
from telepresence.cli.compare import main as compare_main


def _write(folder, gain_raw=0.0, gain_memory=None, clips=("c1", "c2", "c3", "c4")):
    """An eval output folder: clip pairs with baseline and raw (and memory) head PSNRs."""
    pairs = []
    for i, clip in enumerate(clips):
        methods = {"baseline": {"psnr_head": 15.0 + i, "id_dist_target": 0.5},
                   "raw": {"psnr_head": 20.0 + i + gain_raw, "id_dist_target": 0.4}}
        if gain_memory is not None:
            methods["memory"] = {"psnr_head": 20.0 + i + gain_memory, "id_dist_target": 0.38}
        pairs.append({"clip": clip, "ref": 10, "tgt": 3 * i, "bin": "10-20" if i % 2 else "0-10", "methods": methods})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"meta": {}, "pairs": pairs}))
    return folder


def test_two_runs_are_compared_per_bin_and_the_table_is_written(tmp_path, capsys):
    before, after = _write(tmp_path / "main"), _write(tmp_path / "probe", gain_raw=0.25)
    out = tmp_path / "cmp" / "compare.md"
    assert compare_main([str(before), str(after / "results.json"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "# probe:raw against main:raw" in text
    assert "| psnr_head | **all** | 4 | 21.50 | 21.75 | +0.25 | [+0.25, +0.25] | 4 / 0 |" in text
    assert "| psnr_head | 0-10 | 2 |" in text and "| psnr_head | 10-20 | 2 |" in text
    assert out.read_text().strip() == text.strip()


def test_two_methods_of_one_run_through_the_command_line(tmp_path, capsys):
    run = _write(tmp_path / "run", gain_memory=0.5)
    assert cli_main(["compare", f"{run}:raw", f"{run}:memory", "--metrics", "id_dist_target"]) == 0
    text = capsys.readouterr().out
    assert "# run:memory against run:raw" in text
    assert "| id_dist_target | **all** | 4 | 0.400 | 0.380 | -0.020 | [-0.020, -0.020] | 4 / 0 |" in text
    assert "psnr_head" not in text


def test_unreadable_sides_are_one_line_each(tmp_path, capsys):
    run = _write(tmp_path / "run")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{ not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    cases = [
        ([str(tmp_path / "nowhere"), str(run)], "no eval results at"),
        ([str(tmp_path / "bad"), str(run)], "cannot read"),
        ([str(tmp_path / "other.json"), str(run)], "is not the results.json of `telepresence eval`"),
        ([f"{run}:refined", str(run)], "no picture scored with method 'refined'"),
    ]
    for argv, message in cases:
        assert compare_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert compare_main([f"{run}:refined", str(run)]) == 2
    assert "(methods there: baseline, raw)" in capsys.readouterr().err


def test_runs_without_a_picture_in_common_say_so(tmp_path, capsys):
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b", clips=("x1", "x2"))
    assert compare_main([str(a), str(b)]) == 1
    captured = capsys.readouterr()
    assert "share no picture" in captured.err
    assert "4 only in a:raw" in captured.out and "2 only in b:raw" in captured.out


def test_an_out_that_cannot_be_written_is_one_line_after_the_table(tmp_path, capsys):
    before, after = _write(tmp_path / "main"), _write(tmp_path / "probe", gain_raw=0.25)
    (tmp_path / "taken").mkdir()
    assert compare_main([str(before), str(after), "--out", str(tmp_path / "taken")]) == 2
    captured = capsys.readouterr()
    assert "# probe:raw against main:raw" in captured.out  # the table was printed all the same
    assert captured.err.strip().splitlines() == [f"telepresence compare: --out {tmp_path / 'taken'}: Is a directory"]


def test_metrics_neither_side_scored_are_named_not_called_pictures_in_common(tmp_path, capsys):
    """eval --no-landmarks scores no lmk_err_pct: comparing on it said the sides "share no picture", which they do."""
    a, b = _write(tmp_path / "a"), _write(tmp_path / "b", gain_raw=0.25)
    assert compare_main([str(a), str(b), "--metrics", "lmk_err_pct"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "telepresence compare: none of the 4 picture(s) both sides scored has lmk_err_pct on both sides "
        "(eval run with --no-identity or --no-landmarks?)"]


def test_an_out_under_a_file_names_the_file(tmp_path, capsys):
    """mkdir's "File exists" said nothing of which file was in the way."""
    before, after = _write(tmp_path / "main"), _write(tmp_path / "probe", gain_raw=0.25)
    (tmp_path / "a_file").write_text("")
    assert compare_main([str(before), str(after), "--out", str(tmp_path / "a_file" / "sub" / "compare.md")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"telepresence compare: --out {tmp_path / 'a_file' / 'sub' / 'compare.md'}: {tmp_path / 'a_file'} is not a folder"]
