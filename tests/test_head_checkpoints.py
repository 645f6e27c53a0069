"""HF checkpoints of the task-head classes, both ways: transformers' ``*ForSequenceClassification``,
``*ForTokenClassification`` and ``*ForQuestionAnswering`` (llama, mistral, qwen2) load into jaxft with transformers'
logits, and jaxft saves them as transformers loads them. transformers is the oracle throughout."""
import json
import shutil
from typing import NamedTuple

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jaxft
from hf_oracle import AUTO_HEAD_CLASSES, build, build_head, random_ids, save
from jaxft import CheckpointError, ConfigError, HeadConfig
from jaxft.hf.config import config_from_hf
from jaxft.models import heads
from jaxft.ops import nf4
from jaxft.parallel import MeshConfig, make_mesh

FAMILIES = ("llama", "mistral", "qwen2")
TOKEN_LABELS = {0: "O", 1: "B-PER", 2: "I-PER"}
CASES = [(mt, "seq_cls", n) for mt in FAMILIES for n in (1, 3)] + \
        [(mt, "token_cls", 3) for mt in FAMILIES] + [(mt, "qa", 2) for mt in FAMILIES]
LENGTHS = (9, 6, 4)  # real tokens per row of the padded batch
TOL = dict(rtol=0, atol=1e-4)


class Case(NamedTuple):
    model: torch.nn.Module  # the transformers oracle
    folder: object  # what transformers saved
    cfg: jaxft.ModelConfig
    params: dict  # what jaxft loaded from it


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """case(model_type, kind, num_labels): a random transformers head model, saved, and jaxft's load of it."""
    cache = {}

    def case(model_type: str, kind: str, num_labels: int) -> Case:
        key = (model_type, kind, num_labels)
        if key not in cache:
            extra = {"id2label": TOKEN_LABELS} if kind == "token_cls" else {"num_labels": num_labels}
            model = build_head(model_type, kind, seed=len(cache), **extra)
            folder = save(model, tmp_path_factory.mktemp(f"{model_type}_{kind}_{num_labels}") / "hf")
            cache[key] = Case(model, folder, *jaxft.from_pretrained(folder))
        return cache[key]

    return case


def padded(left: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [3, 9] with padding (pad id 0) on the right or the left."""
    t = max(LENGTHS)
    ids, mask = random_ids((len(LENGTHS), t), seed=seed), np.zeros((len(LENGTHS), t), np.int64)
    for row, n in enumerate(LENGTHS):
        mask[row, slice(t - n, t) if left else slice(0, n)] = 1
    return ids * mask, mask


def run_torch(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids), attention_mask=None if mask is None else torch.as_tensor(mask),
                     **kwargs)


def torch_logits(model, kind: str, ids, mask) -> np.ndarray:
    """transformers' logits: pooled [B, N] (seq_cls), per token [B, T, N] (token_cls), start/end [B, T, 2] (qa)."""
    out = run_torch(model, ids, mask)
    if kind == "qa":
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], axis=-1)
    return out.logits.numpy()


def jaxft_logits(case: Case, ids, mask) -> np.ndarray:
    """jaxft's logits in the layout of :func:`torch_logits`."""
    if case.cfg.head.kind == "seq_cls":
        return np.asarray(heads.sequence_logits(case.cfg, case.params, ids, segment_ids=mask)[:, 0])
    return np.asarray(heads.token_logits(case.cfg, case.params, ids, segment_ids=mask))


def assert_same_logits(kind: str, ours, theirs, mask):
    """Sequence scores compared whole; per-token logits at every real token (padding excluded)."""
    if kind == "seq_cls":
        np.testing.assert_allclose(ours, theirs, **TOL)
    else:
        np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], **TOL)


@pytest.mark.parametrize("model_type,kind,num_labels,left",  # left padding matters where a sequence is scored
                         [(*c, False) for c in CASES] + [(*c, True) for c in CASES if c[1] == "seq_cls"])
def test_transformers_head_model_loads_with_its_logits(cases, model_type, kind, num_labels, left):
    case = cases(model_type, kind, num_labels)
    assert case.cfg.head.kind == kind and case.cfg.head.num_labels == num_labels
    ids, mask = padded(left)
    assert_same_logits(kind, jaxft_logits(case, ids, mask), torch_logits(case.model, kind, ids, mask), mask)


@pytest.mark.parametrize("model_type,num_labels", [(mt, n) for mt in FAMILIES for n in (1, 3)])
def test_packed_row_scores_each_document_as_transformers_scores_it_alone(cases, model_type, num_labels):
    case = cases(model_type, "seq_cls", num_labels)
    docs = [random_ids((n,), seed=10 + i) for i, n in enumerate((5, 4, 3, 6, 4))]
    rows = [docs[:3], docs[3:]]  # three documents, then two and padding
    t = 14
    ids, segments = np.zeros((2, t), np.int64), np.zeros((2, t), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for s, doc in enumerate(row, 1):
            ids[r, start:start + len(doc)], segments[r, start:start + len(doc)] = doc, s
            start += len(doc)
    ours = np.asarray(heads.sequence_logits(case.cfg, case.params, ids, segment_ids=segments, num_segments=3))
    alone = [[run_torch(case.model, doc[None]).logits[0].numpy() for doc in row] for row in rows]
    np.testing.assert_allclose(ours[0], np.stack(alone[0]), **TOL)
    np.testing.assert_allclose(ours[1, :2], np.stack(alone[1]), **TOL)
    np.testing.assert_array_equal(ours[1, 2], 0.0)  # no third document in the second row


@pytest.mark.parametrize("model_type,kind,num_labels", CASES)
def test_jaxft_saved_head_model_loads_in_transformers(cases, tmp_path, model_type, kind, num_labels):
    case = cases(model_type, kind, num_labels)
    out = jaxft.save_pretrained(case.cfg, case.params, tmp_path / "saved")
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [type(case.model).__name__]
    # the tensor names transformers writes (Llama's and Qwen2's QA classes keep the decoder under "transformer.")
    assert set(load_file(out / "model.safetensors")) == set(load_file(case.folder / "model.safetensors"))
    theirs = AUTO_HEAD_CLASSES[kind].from_pretrained(out, attn_implementation="eager").eval()
    assert type(theirs) is type(case.model)
    names = TOKEN_LABELS if kind == "token_cls" else {i: f"LABEL_{i}" for i in range(num_labels)}
    assert theirs.config.id2label == names
    assert theirs.config.label2id == {name: i for i, name in names.items()}
    ids, mask = padded()
    assert_same_logits(kind, jaxft_logits(case, ids, mask), torch_logits(theirs, kind, ids, mask), mask)
    assert jaxft.from_pretrained(out)[0] == case.cfg


def test_head_config_from_the_folder(cases):
    assert cases("mistral", "token_cls", 3).cfg.head == HeadConfig("token_cls", 3, labels=("O", "B-PER", "I-PER"),
                                                                  dropout=0.1)
    assert cases("llama", "seq_cls", 1).cfg.head == HeadConfig("seq_cls", 1)  # LABEL_0: no names
    assert cases("llama", "seq_cls", 1).cfg.head.problem == "regression"
    assert cases("qwen2", "qa", 2).cfg.head == HeadConfig("qa", 2)


BASE_HF = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("keys,expected", [
    ({}, HeadConfig("token_cls", 2, dropout=0.1)),
    ({"num_labels": 5, "hidden_dropout": 0.3}, HeadConfig("token_cls", 5, dropout=0.3)),
    ({"classifier_dropout": 0.2, "hidden_dropout": 0.3, "id2label": {"1": "b", "0": "a"}},
     HeadConfig("token_cls", 2, labels=("a", "b"), dropout=0.2)),
], ids=["defaults", "num_labels_and_hidden_dropout", "classifier_dropout_and_names"])
def test_token_head_config_keys_as_transformers_reads_them(keys, expected):
    hf = {**BASE_HF, "architectures": ["LlamaForTokenClassification"], **keys}
    assert config_from_hf(hf).head == expected


def test_sequence_head_problem_type_and_causal_lm_configs():
    hf = {**BASE_HF, "architectures": ["LlamaForSequenceClassification"], "num_labels": 4,
          "problem_type": "multi_label_classification"}
    assert config_from_hf(hf).head == HeadConfig("seq_cls", 4, problem_type="multi_label_classification")
    assert config_from_hf({**BASE_HF, "architectures": ["LlamaForCausalLM"], "num_labels": 4}).head is None
    assert config_from_hf(BASE_HF).head is None


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """A qwen2 causal LM (qkv biases) and its folder."""
    model = build("qwen2", seed=3)
    return model, save(model, tmp_path_factory.mktemp("causal") / "hf")


def test_causal_lm_folder_with_head_keeps_the_decoder_and_adds_a_new_head(causal):
    model, folder = causal
    head = HeadConfig("seq_cls", num_labels=3)
    cfg, params = jaxft.from_pretrained(folder, head=head, head_seed=7)
    base_cfg, base = jaxft.from_pretrained(folder)
    assert cfg == base_cfg.replace(head=head)
    assert "lm_head" not in params and set(params) == {"embed_tokens", "layers", "norm", "score"}
    # the head transformers' _init_weights would draw, as jaxft.init_params makes it
    np.testing.assert_array_equal(params["score"]["kernel"], jaxft.init_params(cfg, jax.random.PRNGKey(7))["score"]
                                  ["kernel"])
    assert params["score"]["kernel"].shape == (cfg.hidden_size, 3) and np.std(params["score"]["kernel"]) > 0.01
    for group in ("embed_tokens", "layers", "norm"):
        jax.tree.map(np.testing.assert_array_equal, params[group], base[group])
    ids, mask = padded()
    hidden = run_torch(model, ids, mask, output_hidden_states=True).hidden_states[-1].numpy()
    ours = np.asarray(heads.features(cfg, params, ids, segment_ids=mask)[:, 0])
    np.testing.assert_allclose(ours, hidden[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1], **TOL)
    assert heads.sequence_logits(cfg, params, ids, segment_ids=mask).shape == (len(LENGTHS), 1, 3)


@pytest.mark.parametrize("layer", [0, 1, -1])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_features_are_transformers_hidden_states_pooled(causal, layer, pooling):
    model, folder = causal
    cfg, params = jaxft.from_pretrained(folder)
    ids, mask = padded(seed=4)
    hidden = run_torch(model, ids, mask, output_hidden_states=True).hidden_states[layer].numpy()
    if pooling == "last":
        want = hidden[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1]
    else:
        want = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    ours = heads.features(cfg, params, ids, segment_ids=mask, layer=layer, pooling=pooling)[:, 0]
    np.testing.assert_allclose(np.asarray(ours), want, **TOL)


def test_head_model_loads_with_nf4_decoder_and_dense_head(cases):
    case = cases("qwen2", "token_cls", 3)
    cfg, params = jaxft.from_pretrained(case.folder, quant="nf4")
    assert isinstance(params["layers"]["q_proj"]["kernel"], nf4.QuantizedTensor)
    assert not isinstance(params["score"]["kernel"], nf4.QuantizedTensor)
    jax.tree.map(np.testing.assert_array_equal, params["score"], case.params["score"])
    ids, mask = padded()
    logits = np.asarray(heads.token_logits(cfg, params, ids, segment_ids=mask))
    assert logits.shape == (len(LENGTHS), max(LENGTHS), 3) and np.isfinite(logits).all()


def test_head_models_load_sharded_as_unsharded(cases, causal):
    mesh = make_mesh(MeshConfig(1, 8, 1))
    case = cases("llama", "qa", 2)
    _, params = jaxft.from_pretrained(case.folder, mesh=mesh)
    jax.tree.map(np.testing.assert_array_equal, params, case.params)
    head = HeadConfig("token_cls", 3)
    _, params = jaxft.from_pretrained(causal[1], mesh=mesh, head=head, head_seed=1)
    jax.tree.map(np.testing.assert_array_equal, params, jaxft.from_pretrained(causal[1], head=head, head_seed=1)[1])


def test_qa_decoder_loads_under_either_prefix(cases, tmp_path):
    case = cases("llama", "qa", 2)
    tensors = load_file(case.folder / "model.safetensors")
    assert any(name.startswith("transformer.layers.") for name in tensors)
    renamed = {name.replace("transformer.", "model.", 1): t for name, t in tensors.items()}
    shutil.copy(case.folder / "config.json", tmp_path / "config.json")
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    jax.tree.map(np.testing.assert_array_equal, jaxft.from_pretrained(tmp_path)[1], case.params)
    save_file({**tensors, **renamed}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensors 'model\.(\S+)' and 'transformer\.\1' are one tensor"):
        jaxft.from_pretrained(tmp_path)


def test_sequence_classifier_without_pad_token_id_is_refused_on_save(cases, tmp_path):
    case = cases("llama", "seq_cls", 3)
    with pytest.raises(ConfigError, match=r"pad_token_id.*cfg.replace\(pad_token_id=tokenizer.pad_token_id\)"):
        jaxft.save_pretrained(case.cfg.replace(pad_token_id=None), case.params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_head_argument_that_disagrees_with_the_folder_names_both(cases):
    folder = cases("llama", "seq_cls", 3).folder
    for head in (HeadConfig("seq_cls", 2), HeadConfig("token_cls", 3)):
        with pytest.raises(ConfigError, match=rf"'seq_cls' head with 3 labels.*'{head.kind}' head with "
                                              rf"{head.num_labels}"):
            jaxft.from_pretrained(folder, head=head)
    multi = HeadConfig("seq_cls", 3, problem_type="multi_label_classification")
    assert jaxft.from_pretrained(folder, head=multi)[0].head == multi  # agreeing: the argument's problem type


def test_unknown_head_architecture_is_a_config_error(cases, tmp_path):
    folder = cases("llama", "seq_cls", 3).folder
    for name in ("model.safetensors", "config.json"):
        shutil.copy(folder / name, tmp_path / name)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "architectures": ["LlamaForSomethingElse"]}))
    with pytest.raises(ConfigError, match="config.json: architectures \\['LlamaForSomethingElse'\\].*"
                                          "LlamaForSequenceClassification"):
        jaxft.from_pretrained(tmp_path)
