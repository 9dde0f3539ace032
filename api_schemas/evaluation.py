"""The evaluation report: what `reidgen evaluate --json` prints and trainers save as eval.json."""
from __future__ import annotations

from pydantic import BaseModel, Field


class EvaluationReport(BaseModel):
    """Market-protocol retrieval results of one model on one query/gallery split."""

    checkpoint: str = Field(description="the checkpoint evaluated")
    data: str = Field(description="the data folder (query/ and bounding_box_test/)")
    num_query: int
    num_gallery: int
    num_valid_queries: int = Field(description="queries with at least one good match (mAP denominator)")
    rank1: float = Field(ge=0, le=1)
    rank5: float = Field(ge=0, le=1)
    rank10: float = Field(ge=0, le=1)
    mAP: float = Field(ge=0, le=1)
    mINP: float = Field(ge=0, le=1)
    cmc: list[float] = Field(description="CMC curve, cmc[k] = share of queries matched within rank k+1")
    parts: list[str] = Field(description="feature parts combined for the score")
    part_weights: list[float]
    flip: bool = Field(description="features averaged over the image and its mirror")
    feature_seconds: float = Field(description="time to extract query and gallery features")
    ranking_seconds: float = Field(description="time to rank the gallery and compute the metrics")
    skipped_images: list[str] = Field(default_factory=list, description="unreadable images left out")

    def table(self) -> str:
        """A small human-readable table."""
        rows = [
            ("Rank-1", f"{100 * self.rank1:6.2f}"), ("Rank-5", f"{100 * self.rank5:6.2f}"),
            ("Rank-10", f"{100 * self.rank10:6.2f}"), ("mAP", f"{100 * self.mAP:6.2f}"),
            ("mINP", f"{100 * self.mINP:6.2f}"),
        ]
        head = (f"{self.checkpoint}\n  on {self.data}: {self.num_query} queries × {self.num_gallery} gallery"
                f" (features {self.feature_seconds:.1f} s, ranking {self.ranking_seconds:.2f} s)")
        body = "\n".join(f"  {name:<8} {value} %" for name, value in rows)
        return f"{head}\n{body}"
