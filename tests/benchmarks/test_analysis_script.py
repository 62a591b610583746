"""benchmarks/analysis_smollm2.py's table: the report's intervention table as markdown, one column
per text when the windows came from several."""

from bench_scripts import load_script

an = load_script("analysis_smollm2")


def _row(name, ppl, by, base):
    return {
        "name": name,
        "ppl": ppl,
        "ppl_ratio": ppl / base["ppl"],
        "ppl_by_source": by,
        "ratio_by_source": {t: v / base["ppl_by_source"][t] for t, v in by.items()},
        "top1": " cold",
        "top1_prob": 0.5,
    }


def test_table_has_a_column_per_text():
    base = {"ppl": 20.0, "ppl_by_source": {"wiki": 25.0, "code": 16.0}}
    rows = [_row("none", 20.0, base["ppl_by_source"], base), _row("super weights -> 0", 60.0, {"wiki": 50.0, "code": 72.0}, base)]
    lines = an.markdown_table({"interventions": {"rows": rows}})
    assert lines[0] == "| intervention | ppl | ratio | wiki ppl (x) | code ppl (x) | top-1 next token | p(top-1) | p(original top-1) |"
    assert lines[1].count("---") == 8 and len(lines) == 4
    assert lines[3].split(" | ")[1:5] == ["60", "3", "50 (2x)", "72 (4.5x)"]


def test_table_of_one_text_keeps_the_old_columns():
    rows = [{"name": "none", "ppl": 22.87, "ppl_ratio": 1.0, "top1": " cold", "top1_prob": 0.1}]
    lines = an.markdown_table({"interventions": {"rows": rows}})
    assert lines[0] == "| intervention | ppl | ratio | top-1 next token | p(top-1) | p(original top-1) |"
    assert lines[2] == "| none | 22.87 | 1 | ' cold' | 0.1 | 0.1 |"
