"""Exported weights as an MLflow Model (pyfunc flavour): what the model registry serves.

Input: a DataFrame with one image per row, either column ``image`` (uint8 pixels, height x
width x channels with 1 or 3 channels, any size) or column ``uri`` (an image file on any fsspec
URI, decoded as dinoforge's data layer does). Output: ``{"cls": float32 (N, D)}``, the
L2-normalised CLS embeddings that evaluation and curation use, prepared as the weights' JSON says
(resize, centre crop, normalise); with the param ``patch_tokens=True`` also ``"patch_tokens"``:
the last block's normed patch tokens (N, P, D). The model's artifacts are the official-format
weights and their JSON, as ``dinoforge export`` wrote them.
"""

from __future__ import annotations

import json
from importlib.metadata import version

import mlflow.pyfunc
import numpy as np
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema, TensorSpec

WEIGHTS, META = "weights", "meta"


def signature(meta: dict) -> ModelSignature:
    """Inputs and params as the module docstring says; output shapes from the weights' JSON."""
    dim, tokens = meta["embed_dim"], (meta["image_size"] // meta["patch_size"]) ** 2
    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(Array(Array(Array(DataType.long))), "image", required=False),
                ColSpec(DataType.string, "uri", required=False),
            ]
        ),
        outputs=Schema(
            [
                TensorSpec(np.dtype("float32"), (-1, dim), "cls"),
                TensorSpec(np.dtype("float32"), (-1, tokens, dim), "patch_tokens"),
            ]
        ),
        params=ParamSchema([ParamSpec("patch_tokens", DataType.boolean, False)]),
    )


class DinoEmbedder(mlflow.pyfunc.PythonModel):
    """The pyfunc model: ``predict`` embeds images with the exported backbone."""

    def load_context(self, context) -> None:
        from dinoforge.export import load_backbone

        self.backbone, self.meta = load_backbone(context.artifacts[WEIGHTS])

    def _pixels(self, row) -> "torch.Tensor":  # noqa: F821 (torch is imported lazily)
        import torch
        from dinoforge.data.decode import DecodeLimits, decode_image

        uri, image = row.get("uri"), row.get("image")
        if isinstance(uri, str) and uri:
            import fsspec

            with fsspec.open(uri, "rb") as handle:
                return decode_image(handle.read(), DecodeLimits())
        pixels = np.asarray(image)
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3) or pixels.min() < 0 or pixels.max() > 255:
            raise ValueError(f"an image must be uint8 height x width x 1 or 3 channels, got shape {pixels.shape}")
        return torch.from_numpy(pixels.astype(np.uint8)).permute(2, 0, 1).contiguous()

    def predict(self, context, model_input, params: dict | None = None) -> dict[str, np.ndarray]:
        import torch
        from dinoforge.eval.features import batched, cls_features, prepare_image

        rows = model_input.to_dict("records")
        meta = self.meta
        images = torch.stack(
            [
                prepare_image(self._pixels(row), meta["image_size"], meta["resize_size"], meta["mean"], meta["std"])
                for row in rows
            ]
        )
        out = {"cls": cls_features(self.backbone, images).numpy()}
        if (params or {}).get("patch_tokens"):
            tokens = batched(self.backbone, images, lambda model, x: model.forward_features(x)["x_norm_patchtokens"])
            out["patch_tokens"] = tokens.numpy()
        return out


def save(weights: str, meta_path: str, path: str, mlflow_model: Model | None = None) -> None:
    """Writes the MLflow Model for local ``weights`` (+ their JSON ``meta_path``) to ``path``.
    Requirements are listed rather than inferred (inference would load the model)."""
    import torch

    with open(meta_path) as handle:
        meta = json.load(handle)
    missing = [
        key for key in ("embed_dim", "image_size", "patch_size", "resize_size", "mean", "std") if key not in meta
    ]
    if missing:
        raise ValueError(f"{meta_path} is not an export's JSON: no {', '.join(missing)}")
    requirements = [
        f"dinoforge=={version('dinoforge')}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        f"mlflow=={mlflow.__version__}",
    ]
    mlflow.pyfunc.save_model(
        path,
        python_model=DinoEmbedder(),
        artifacts={WEIGHTS: weights, META: meta_path},
        signature=signature(meta),
        pip_requirements=requirements,
        mlflow_model=mlflow_model,
        metadata={"dinoforge": {k: v for k, v in meta.items() if not isinstance(v, (list, dict))}},
    )
