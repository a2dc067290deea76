"""The tool vocabulary: the single source of truth for the tool agents' names, purposes and arguments.

The router, the served-LLM planner (as function schemas), the graph and the UI all read this.
Importable without numpy or torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field


class DetectorArgs(BaseModel):
    """Find, name, box and measure anatomy and lesions on the current study."""

    regions: list[str] = Field(default_factory=list, description="Canonical region names; empty = whole chest.")
    lesion_kind: Literal["nodule", "mass", "opacity"] | None = Field(
        default=None, description="Lesion type asked about, if any.")
    want: Literal["lesions", "anatomy", "describe"] = Field(
        default="lesions", description="lesions: find lesions; anatomy: where is a structure; describe: region-to-text.")
    box_mm: list[float] | None = Field(default=None, description="A box [x0,y0,z0,x1,y1,z1] in patient mm (LPS).")
    finding_ids: list[str] = Field(default_factory=list,
                                   description="Restrict the answer to these findings (e.g. ['F2']).")


class ComparerArgs(BaseModel):
    """Compare the current study with the prior: match findings and classify their change."""

    regions: list[str] = Field(default_factory=list, description="Restrict the comparison to these regions.")
    focus: Literal["all", "new", "resolved", "grew", "shrank", "stable", "largest"] = "all"


class ReportArgs(BaseModel):
    """Write a structured radiology report (findings, comparison, impression)."""

    include_comparison: bool = True


class PrognosisArgs(BaseModel):
    """Estimate survival from image-derived and clinical features with a validated model."""

    clinical: dict[str, str] = Field(default_factory=dict, description="Clinical features given by the clinician.")
    question: Literal["survival", "recurrence"] = "survival"


class VerifierArgs(BaseModel):
    """Report how reliable the last answer was (re-asking and re-measuring), or re-check it."""

    recheck: bool = False


class VisualQuestionArgs(BaseModel):
    """Ask the vision-language model a visual question the measuring tools cannot answer."""

    question: str = Field(default="", description="The visual question (default: the clinician's message).")
    regions: list[str] = Field(default_factory=list, description="Regions to look at; empty = whole chest.")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str  # shown in the chat's collapsible step
    description: str
    args: type[BaseModel]
    needs_prior: bool = False
    looks_at_pixels: bool = True


TOOLS: dict[str, ToolSpec] = {
    t.name: t
    for t in (
        ToolSpec("detector", "Grounded detector",
                 "Finds and names anatomical regions and lesions; text-to-region and region-to-text.", DetectorArgs),
        ToolSpec("comparer", "Longitudinal comparer",
                 "Aligns the prior exam to the current one, matches findings and measures change.", ComparerArgs,
                 needs_prior=True),
        ToolSpec("report_writer", "Report writer",
                 "Writes a structured report whose sentences point at the findings they rest on.", ReportArgs),
        ToolSpec("prognosis", "Prognosis predictor",
                 "Survival estimates from image-derived and clinical features, with the model card.", PrognosisArgs),
        ToolSpec("verifier", "Self-consistency verifier",
                 "Re-asks and re-measures under paraphrase and perturbation; gives a reliability index.", VerifierArgs,
                 looks_at_pixels=False),
        ToolSpec("vlm", "Visual question (vision-language model)",
                 "Visual questions the measuring tools cannot answer (e.g. pneumothorax, effusion, describe the "
                 "image), answered by the served vision-language model and marked unverified.", VisualQuestionArgs),
    )
}

TOOL_NAMES = tuple(TOOLS)


def validate_args(tool: str, args: dict) -> BaseModel:
    """Parse a tool call's arguments (e.g. from a served model) into its typed schema."""
    if tool not in TOOLS:
        from tools.errors import ToolError

        raise ToolError(f"Unknown tool '{tool}'. Known tools: {', '.join(TOOL_NAMES)}.")
    return TOOLS[tool].args.model_validate(args or {})
