"""Explanations of latents end to end: an OpenAI-compatible endpoint (a local mock server that answers as an
oracle of the planted latent, or says yes to everything), a tiny local Hugging Face model, and JSON import."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import threading

import pytest
import torch
from harvest_helpers import WORDS, word_tokenizer
from inspect_helpers import HOOK, PLANTED_LATENT, planted_model_and_sae, token_contexts

from saelab.inspect import InspectConfig, collect_features, write_site
from saelab.inspect.explain import ExplainConfig, HFClient, OpenAIClient, explain_site, import_explanations
from saelab.inspect.explain.prompts import parse_explanation, parse_labels
from saelab.inspect.explain.run import split_examples
from saelab.inspect.site import read_explanations
from saelab.inspect.site_reader import SiteReader

PLANTED_WORD = "w7"


@pytest.fixture(scope="module")
def planted_site(tmp_path_factory):
    """A site of the planted model: latent 7 fires on w7 and nowhere else."""
    model, sae = planted_model_and_sae(tmp_path_factory.mktemp("tok"))
    cfg = InspectConfig(
        n_top=8, n_bands=4, per_band=4, n_random=64, batch_size=16, window_before=5, window_after=3
    )
    data = collect_features(model, sae, token_contexts(160, seed=21), hook_name=HOOK, cfg=cfg)
    out = tmp_path_factory.mktemp("site") / "inspect"
    write_site(data, out)
    return out


def numbered(prompt: str) -> list[str]:
    return re.findall(r"^\d+\. (.*)$", prompt, flags=re.M)


def words_in(text: str) -> list[str]:
    """The word tokens of a window's text (they are shown joined: "w1w7<pad>w3")."""
    return re.findall(r"w\d+", text)


def oracle(prompt: str) -> str:
    """Answers as someone who knows the planted latent fires exactly on w7."""
    if "What pattern does the feature respond to?" in prompt:
        return f"Explanation: the word {PLANTED_WORD}"
    if "marked at random" in prompt:  # fuzzing: right iff every marked token is the planted word
        labels = [
            all(set(words_in(span)) == {PLANTED_WORD} for span in re.findall(r"<<(.*?)>>", line))
            for line in numbered(prompt)
        ]
    else:  # detection
        labels = [PLANTED_WORD in words_in(line) for line in numbered(prompt)]
    return "[" + ", ".join("1" if yes else "0" for yes in labels) + "]"


def yes_to_everything(prompt: str) -> str:
    if "What pattern does the feature respond to?" in prompt:
        return "Explanation: everything"
    return "[" + ", ".join("1" for _ in numbered(prompt)) + "]"


class ChatCompletions(http.server.BaseHTTPRequestHandler):
    """POST /v1/chat/completions: the server's `answer(prompt)` in the chat-completions format; the first
    `fail_first` requests get HTTP 503."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        server.requests.append((self.path, self.headers.get("Authorization"), body))
        if len(server.requests) <= server.fail_first:
            self.send_response(503)
            self.end_headers()
            return
        reply = json.dumps(
            {
                "choices": [
                    {
                        "message": {
                            "role": "assistant",
                            "content": server.answer(body["messages"][-1]["content"]),
                        }
                    }
                ]
            }
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def mock_endpoint(answer, fail_first: int = 0):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletions)
    server.answer, server.requests, server.fail_first = answer, [], fail_first
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_openai_compatible_explainer_end_to_end(planted_site, monkeypatch):
    """The oracle's explanation of the planted latent scores 1.0 on detection and fuzzing over held-out
    examples; saying yes to everything scores 0.5 (chance); the key comes from the environment."""
    monkeypatch.setenv("SAELAB_TEST_KEY", "sekret")
    cfg = ExplainConfig(
        explainer="openai", model="mock-model", api_key_env="SAELAB_TEST_KEY", latents=[PLANTED_LATENT, 3],
        n_explain_top=4, n_score=6, examples_per_prompt=4, retries=1, concurrency=1,
    )  # fmt: skip
    with mock_endpoint(oracle, fail_first=1) as (server, url):
        client = OpenAIClient(url, cfg.model, cfg.api_key_env, retries=cfg.retries)
        payload = explain_site(planted_site, client, cfg)
    got = payload["latents"][str(PLANTED_LATENT)]
    assert got["text"] == f"the word {PLANTED_WORD}" and got["by"] == "openai:mock-model"
    assert got["detection"] == 1.0 and got["fuzzing"] == 1.0 and got["failures"] == 0
    assert got["scored_on"] == [6, 6]
    assert read_explanations(planted_site)["latents"][str(PLANTED_LATENT)] == got  # stored beside the data
    path, auth, body = server.requests[1]
    assert path == "/v1/chat/completions" and auth == "Bearer sekret" and body["model"] == "mock-model"
    assert (
        len(server.requests) > 2 and server.requests[0][2] == server.requests[1][2]
    )  # retried after the 503
    # the explainer never saw the held-out examples it is scored on
    site = SiteReader(planted_site)
    shown, held = split_examples(site, PLANTED_LATENT, cfg)
    assert len(held) == 6 and not {e.key for e in shown} & {e.key for e in held}
    prompts = [b["messages"][-1]["content"] for _, _, b in server.requests[1:]]
    explain_prompt = next(p for p in prompts if "What pattern" in p)
    assert explain_prompt.count("Example ") == len(shown)
    # chance level: a scorer that says yes to everything
    cfg.overwrite, cfg.latents = True, [PLANTED_LATENT]
    with mock_endpoint(yes_to_everything) as (_, url):
        payload = explain_site(planted_site, OpenAIClient(url, "mock-model"), cfg)
    got = payload["latents"][str(PLANTED_LATENT)]
    assert got["text"] == "everything" and got["detection"] == 0.5 and got["fuzzing"] == 0.5
    assert "3" in payload["latents"]  # kept from the first run
    with mock_endpoint(oracle) as (_, url):  # without overwrite, explained latents are skipped
        cfg.overwrite = False
        server_requests = explain_site(planted_site, OpenAIClient(url, "mock-model"), cfg)
        assert server_requests["latents"][str(PLANTED_LATENT)]["text"] == "everything"


def test_local_hugging_face_explainer(planted_site, tmp_path):
    """A tiny random Llama through transformers: the stored explanation is what greedy generation gives for
    the explanation prompt; its gibberish cannot be parsed as labels, so every scoring prompt fails and
    counts as wrong."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    words = WORDS
    folder = tmp_path / "explainer"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=3 + len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=0)
    ).save_pretrained(folder)  # fmt: skip
    word_tokenizer(words).save_pretrained(folder)
    cfg = ExplainConfig(
        explainer="hf", model=str(folder), latents=[PLANTED_LATENT], n_explain_top=3, n_score=4,
        examples_per_prompt=4, max_new_tokens=6, overwrite=True,
    )  # fmt: skip
    client = HFClient(cfg.model, cfg.max_new_tokens)
    payload = explain_site(planted_site, client, cfg)
    got = payload["latents"][str(PLANTED_LATENT)]
    # reference: generate directly from the same prompt text
    from saelab.inspect.explain.prompts import explanation_messages

    shown, _ = split_examples(SiteReader(planted_site), PLANTED_LATENT, cfg)
    messages = explanation_messages(shown, max(max(e.acts) for e in shown))
    ids = torch.tensor([client.tokenizer("\n\n".join(m["content"] for m in messages) + "\n\n")["input_ids"]])
    with torch.no_grad():
        out = client.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                    pad_token_id=client.tokenizer.pad_token_id)  # fmt: skip
    assert got["text"] == parse_explanation(
        client.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    )
    assert got["by"] == f"hf:{folder}"
    if got["text"]:
        assert got["detection"] == 0.0 and got["fuzzing"] == 0.0
        assert got["failures"] == 2 + 1  # 4 + 4 detection examples in 2 prompts, 4 fuzzing in 1


def test_labels_and_explanations_are_parsed_strictly():
    assert parse_labels("Sure: [1, 0, 1]", 3) == [True, False, True]
    assert parse_labels("[1, 0] then [0, 0, 1]", 3) == [False, False, True]
    assert (
        parse_labels("[1, 0]", 3) is None
        and parse_labels("[1, 2, 0]", 3) is None
        and parse_labels("yes", 1) is None
    )
    assert parse_explanation("Thinking...\nExplanation: 'the word cat'\nmore") == "the word cat"
    assert parse_explanation("plural nouns\nother") == "plural nouns"


def test_explanations_import_from_json(planted_site, tmp_path):
    export = tmp_path / "neuronpedia.json"
    export.write_text(json.dumps([
        {"modelId": "tiny", "layer": "0-res", "index": "5", "description": " numbers",
         "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
        {"modelId": "tiny", "layer": "0-res", "index": "5", "description": "a second one"},
        {"modelId": "tiny", "layer": "0-res", "index": "6", "description": "colours"},
    ]))  # fmt: skip
    before = read_explanations(planted_site)["latents"]
    payload, added = import_explanations(planted_site, export)
    assert added == 2
    assert payload["latents"]["5"] == {
        "text": "numbers",
        "by": "gpt-4o-mini",
        "imported_from": "neuronpedia.json",
    }
    assert payload["latents"]["6"]["text"] == "colours" and payload["latents"]["6"]["by"] == "imported"
    assert read_explanations(planted_site) == payload and all(k in payload["latents"] for k in before)
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"6": "hues"}))
    assert import_explanations(planted_site, mapping)[1] == 0  # kept without overwrite
    assert import_explanations(planted_site, mapping, overwrite=True)[0]["latents"]["6"]["text"] == "hues"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"index": 480, "description": "x"}]))
    with pytest.raises(ValueError, match="outside this SAE's 0-47"):
        import_explanations(planted_site, bad)
    bad.write_text(json.dumps([{"feature": 1, "label_text": "x"}]))
    with pytest.raises(ValueError, match="needs a latent id .* and a text"):
        import_explanations(planted_site, bad)
    with pytest.raises(ValueError, match="explain.explainer='gpt' must be one of"):
        ExplainConfig(explainer="gpt").validate()
    with pytest.raises(ValueError, match="explain.model="):
        ExplainConfig(explainer="hf").validate()
