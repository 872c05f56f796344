"""MLflow models-from-code entry point of a registered Astra adapter (no pickled Python objects).

The registered model is this file plus the artifacts: the adapter checkpoint folder
(``adapter.safetensors`` + ``astra_config.json``, the format ``astra.model.io.load_astra`` reads).
``mlflow.artifacts.download_artifacts("models:/NAME/VERSION")`` gives the folder back; serving loads
it with the base Wan weights. ``predict`` only says where the adapter is: generation is the chunk
engine's job, not a pyfunc's.
"""

import mlflow.pyfunc
from mlflow.models import set_model


class AstraAdapter(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.adapter_path = context.artifacts["adapter"]

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        return [self.adapter_path for _ in model_input]


set_model(AstraAdapter())
