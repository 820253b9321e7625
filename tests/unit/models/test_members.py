"""Member builders: tiny random-init encoders, the student's layer copy, export round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ensemble.models import members as M

TINY_ARCH = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
             "intermediate_size": 64}
TEXTS = ["a gorgeous , witty film", "dull and far too long", "it is a movie ."]


def _inputs(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))


@pytest.mark.parametrize(
    ("teacher", "student", "expected"),
    [(6, 3, [1, 3, 5]), (12, 4, [2, 5, 8, 11]), (12, 3, [3, 7, 11]), (2, 1, [1]),
     (4, 4, [0, 1, 2, 3]), (6, 1, [5]), (5, 2, [1, 4])],
)
def test_student_layer_map(teacher: int, student: int, expected: list[int]) -> None:
    chosen = M.student_layer_map(teacher, student)
    assert chosen == expected
    assert chosen[-1] == teacher - 1  # the last layer is always kept
    assert chosen == sorted(set(chosen))


@pytest.mark.parametrize("student", [0, 7])
def test_student_layer_map_rejects_impossible_sizes(student: int) -> None:
    with pytest.raises(ValueError, match="must be between 1 and the teacher's 6"):
        M.student_layer_map(6, student)


def test_tiny_member_shapes(tiny_member, tokenizer) -> None:
    clf = tiny_member(5).eval()
    assert clf.config.num_hidden_layers == 2 and clf.config.hidden_size == 32
    assert clf(**_inputs(tokenizer)).logits.shape == (3, 5)
    reg = tiny_member(1, regression=True).eval()
    assert reg.config.problem_type == "regression" and reg.config.num_labels == 1
    assert reg(**_inputs(tokenizer)).logits.shape == (3, 1)


def test_make_student_copies_the_chosen_teacher_layers(tiny_member) -> None:
    teacher = tiny_member(5, layers=4, seed=3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = M.make_student(teacher, 2)
    chosen = M.student_layer_map(4, 2)  # [1, 3]
    assert chosen == [1, 3]
    assert student.config.num_hidden_layers == 2
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is not touched
    t_state, s_state = teacher.state_dict(), student.state_dict()
    layer_keys = 0
    for key, value in s_state.items():
        if ".layer." in key:
            idx = int(key.split(".layer.")[1].split(".")[0])
            src = key.replace(f".layer.{idx}.", f".layer.{chosen[idx]}.")
            layer_keys += 1
        else:
            src = key  # embeddings, pooler, head
        assert torch.equal(value, t_state[src]), key
    assert layer_keys > 0
    # it is a copy: training the student leaves the teacher alone
    with torch.no_grad():
        student.bert.encoder.layer[0].output.dense.weight.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert M.count_parameters(student) < M.count_parameters(teacher)


def test_make_student_is_the_teacher_with_fewer_layers(tiny_member, tokenizer) -> None:
    # keeping every layer reproduces the teacher's outputs exactly
    teacher = tiny_member(5, layers=2, seed=4).eval()
    clone = M.make_student(teacher, 2).eval()
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs).logits, teacher(**inputs).logits)


def test_export_round_trip_through_plain_transformers(tiny_member, tokenizer, tmp_path: Path):
    for kind, labels in (("classifier", 5), ("regressor", 1)):
        model = tiny_member(labels, regression=kind == "regressor", seed=5).eval()
        path = tmp_path / kind
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        inputs = _inputs(tokenizer)
        with torch.no_grad():
            expected = model(**inputs).logits
            loaded, tok = M.load_exported(path)
            plain = AutoModelForSequenceClassification.from_pretrained(path).eval()
            plain_tok = AutoTokenizer.from_pretrained(path)
            for reloaded, tk in ((loaded.eval(), tok), (plain, plain_tok)):
                again = tk(TEXTS, padding=True, return_tensors="pt")
                assert torch.equal(again["input_ids"], inputs["input_ids"])
                torch.testing.assert_close(reloaded(**dict(again)).logits, expected,
                                           rtol=1e-6, atol=1e-7)
        assert plain.config.num_labels == labels


def test_layer_index(tiny_member) -> None:
    model = tiny_member(5)
    depth = {name: M.layer_index(name, 2) for name, _ in model.named_parameters()}
    assert depth["bert.embeddings.word_embeddings.weight"] == 0
    assert depth["bert.encoder.layer.0.attention.self.query.weight"] == 1
    assert depth["bert.encoder.layer.1.output.LayerNorm.bias"] == 2
    assert depth["classifier.weight"] == 3 and depth["bert.pooler.dense.weight"] == 3
    assert set(depth.values()) == {0, 1, 2, 3}


def test_mlm_encoder_matches_the_member_encoder(tiny_member) -> None:
    # the mlm stage trains under an MLM head and puts the encoder back under the member's head
    member = tiny_member(5)
    mlm = M.build_mlm("default", pretrained=False, arch=TINY_ARCH)
    missing, unexpected = mlm.base_model.load_state_dict(member.base_model.state_dict(),
                                                         strict=False)
    assert not missing  # every encoder weight carries over; only the member's pooler is extra
    assert unexpected and all(k.startswith("pooler.") for k in unexpected)
    member.base_model.load_state_dict(mlm.base_model.state_dict(), strict=False)
    assert torch.equal(member.bert.encoder.layer[1].output.dense.weight,
                       mlm.bert.encoder.layer[1].output.dense.weight)


def test_unknown_model_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="model: default"):
        M.load_tokenizer(str(tmp_path / "no-such-model"))
    with pytest.raises(OSError, match="model: default"):
        M.build_member(str(tmp_path / "no-such-model"), 3, pretrained=False)


def test_named_labels_reach_a_plain_pipeline(tiny_member, tokenizer, tmp_path: Path) -> None:
    from transformers import pipeline

    names = ["very negative", "negative", "neutral", "positive", "very positive"]
    model = tiny_member(5, seed=5).eval()
    M.name_labels(model, names, regression=False)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    answer = pipeline("text-classification", model=str(tmp_path), device="cpu")(TEXTS[0])
    assert answer[0]["label"] in names
    regressor = tiny_member(1, regression=True, seed=5)
    M.name_labels(regressor, names, regression=True)
    assert regressor.config.id2label == {0: "intensity"}
    with pytest.raises(ValueError, match="label names"):
        M.name_labels(model, names[:3], regression=False)
