"""MLflow pyfunc written as models-from-code: question + context of any length -> answer span.

Logged by the register stage with `python_model=<this file>`; MLflow runs this file to build the
model, so nothing is pickled. The model does its own context splitting.
"""

from __future__ import annotations

import json

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class SpanQAModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from transformers import AutoModelForQuestionAnswering, AutoTokenizer

        from tasks.inference import default_device

        with open(context.artifacts["settings"]) as fh:
            self.settings = json.load(fh)
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["model_dir"])
        self.model = AutoModelForQuestionAnswering.from_pretrained(context.artifacts["model_dir"])
        self.model.to(default_device()).eval()

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        from tasks.inference import answer_questions

        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        for column in ("question", "context"):
            if column not in model_input.columns:
                raise ValueError(f"input is missing the column {column!r} (needs 'question' and 'context')")
        records = []
        for i, row in enumerate(model_input.itertuples(index=False)):
            question, text = row.question, row.context
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"row {i}: 'question' must be a non-empty string")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"row {i}: 'context' must be a non-empty string")
            records.append(
                {"id": str(i), "question": question, "context": text, "answers": {"text": [], "answer_start": []}}
            )
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
            s["precision"],
        )
        return pd.DataFrame(
            {
                "answer": [a.text for a in answers],
                "start": [a.start for a in answers],
                "end": [a.end for a in answers],
                "score": [a.score for a in answers],
            }
        )


mlflow.models.set_model(SpanQAModel())
