"""MLflow pyfunc written as models-from-code: question + context of any length -> answer span.

Logged by the register stage with `python_model=<this file>`; MLflow runs this file to build the
model, so nothing is pickled. The model does its own context splitting.

Each row of the output: `answer`, its character offsets `start` and `end` (`context[start:end] == answer`),
`score`, the answer's probability in [0, 1] (in the chunk of the context most sure of it: p(start) * p(end),
each a softmax over the chunk's context tokens and [CLS], added up over that chunk's spans with the answer's
text; a long or repeated context cannot push it past 1), and `no_answer_score`, the probability in [0, 1] that
the context holds no answer (p([CLS], [CLS]) in the chunk least sure of that): for SQuAD 2.0 models, the number
to abstain on. spanflow/answering/spans.py has the details. A version registered on SQuAD 2.0 dev data abstains
as the evaluation did (eval.no_answer_threshold): `answer` "" at `start` = `end` = -1.

It answers with the runtime it was registered with (serving.runtime, else eval.runtime): torch, or ONNX Runtime
from the `onnx_model` artifact (spanflow/answering/onnx_runtime.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext


class BadRequest(MlflowException):
    """A request spanflow refuses: the scoring server answers it with HTTP 400 and keeps serving.

    MLflow's scoring server (`mlflow.pyfunc.scoring_server.invocations`) rewrites the message of any MlflowException
    raised in predict to `Failed to predict data '<the request as a pandas table>'. Error: <message>`: the reason
    comes last, after an echo of the request (a long context included). This exception's message is set once, at
    construction, and keeps that value: the 400 body says spanflow's reason and nothing else."""

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_reason"):  # MlflowException.__init__ sets it; later assignments are the echo
            self._reason = value


def bad_request(message: str) -> BadRequest:
    """HTTP 400 with `message` as the whole of the body's message."""
    return BadRequest(message, error_code=INVALID_PARAMETER_VALUE)


def request_records(model_input: pd.DataFrame | dict, max_batch: int) -> list[dict]:
    """Rows of question + context, checked field by field; any bad value raises `bad_request`."""
    if isinstance(model_input, dict):  # the `inputs` format: columns of values
        try:
            model_input = pd.DataFrame(model_input)
        except ValueError:  # single values, or columns of unequal lengths
            raise bad_request("input must be rows of question and context (lists of equal length)") from None
    if not isinstance(model_input, pd.DataFrame):
        raise bad_request(f"input must be rows of question and context, got {type(model_input).__name__}")
    if len(model_input) == 0:
        raise bad_request("the request has no rows")
    for column in ("question", "context"):
        if column not in model_input.columns:
            raise bad_request(f"field {column!r} is missing (each row needs 'question' and 'context')")
    if len(model_input) > max_batch:
        raise bad_request(f"batch of {len(model_input)} rows is over serving.max_batch = {max_batch}")
    records = []
    for i, row in enumerate(model_input[["question", "context"]].itertuples(index=False)):
        for field, value in (("question", row.question), ("context", row.context)):
            if not isinstance(value, str):
                raise bad_request(f"row {i}: field {field!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise bad_request(f"row {i}: field {field!r} is empty")
        no_gold = {"text": [], "answer_start": []}
        records.append({"id": str(i), "question": row.question, "context": row.context, "answers": no_gold})
    return records


def torch_threads_from_env(environ: Mapping[str, str] = os.environ) -> int | None:
    """The torch threads this serving process is given (`spanflow serve --workers N` sets SPANFLOW_TORCH_THREADS
    to the usable CPUs // N); None when unset: torch's own default."""
    from spanflow.serving import THREADS_ENV

    value = environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}: must be a whole number >= 1")
    return int(value)


class SpanQAModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        import torch

        from spanflow.answering.inference import default_device, load_answering_model, load_ensemble_model
        from spanflow.models.modeling import load_saved_tokenizer

        threads = torch_threads_from_env()
        if threads is not None:  # before the model loads; the request threads inherit it
            torch.set_num_threads(threads)
        with open(context.artifacts["settings"]) as fh:
            self.settings = json.load(fh)
        self.tokenizer = load_saved_tokenizer(context.artifacts["model_dir"])
        if self.settings.get("ensemble_rule"):  # members model_dir, model_dir_1, ...: one torch module
            members = [context.artifacts["model_dir"]]
            members += [context.artifacts[f"model_dir_{k}"] for k in range(1, self.settings["ensemble_members"])]
            self.precision = self.settings["precision"]
            self.model = load_ensemble_model(members, self.settings["ensemble_rule"], self.precision, default_device())
            return
        # models registered before serving.runtime existed answer with torch
        self.model, self.precision = load_answering_model(
            context.artifacts["model_dir"],
            self.settings.get("runtime", "torch"),
            self.settings["precision"],
            default_device(),
            self.workers(),
            onnx_file=context.artifacts.get("onnx_model"),
        )

    def workers(self) -> int:
        """Batches answered side by side: eval.workers (1 for models registered before it existed), no more than
        torch has threads (a serving process of 1 torch thread answers batches one after another)."""
        import torch

        return max(1, min(self.settings.get("workers", 1), torch.get_num_threads()))

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:

        from spanflow.answering.inference import answer_questions
        from spanflow.answering.spans import REGISTERED_BEFORE_SPAN_SCORING, answer_texts

        records = request_records(model_input, self.settings["max_batch"])
        s = self.settings
        answers = answer_questions(
            self.model,
            self.tokenizer,
            records,
            s["chunk_length"],
            s["overlap"],
            s["max_query_length"],
            s["max_answer_length"],
            s["n_best"],
            s["batch_size"],
            self.precision,
            self.workers(),
            s.get("span_scoring", REGISTERED_BEFORE_SPAN_SCORING),
        )
        # a SQuAD 2.0 model abstains: "" at offsets -1 (models registered before squad_version existed: v1.1)
        texts = answer_texts(answers, s.get("squad_version", "1.1"), s.get("no_answer_threshold", 0.0))
        kept = [text == a.text for text, a in zip(texts, answers, strict=True)]
        return pd.DataFrame(
            {
                "answer": texts,
                "start": [a.start if keep else -1 for a, keep in zip(answers, kept, strict=True)],
                "end": [a.end if keep else -1 for a, keep in zip(answers, kept, strict=True)],
                "score": [a.probability for a in answers],
                "no_answer_score": [a.no_answer_probability for a in answers],
            }
        )


mlflow.models.set_model(SpanQAModel())
