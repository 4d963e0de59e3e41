"""An identity's attributes from its images' predictions and measurements.

Gender: the majority of the images' predicted genders (a tie goes to the gender with the
larger summed probability), with the mean probability the images give it; age and skin
tone (ITA): the median over the images that have one. These fill identities.parquet at
finalize (over the accepted images, dataset.identity_stats) and the audit's groups; a
balanced job takes the probe image's attributes instead (job/balancing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from schemas.tables import GENDERS, IDENTITIES_SCHEMA, IDENTITY_ATTRIBUTE_COLUMNS, skin_tone_of

FROM_PROBE = "probe"
FROM_IMAGES = "accepted images"


@dataclass(frozen=True)
class IdentityAttributes:
    gender: str | None
    gender_probability: float | None
    age: float | None
    skin_ita: float | None
    attributes_from: str | None

    @property
    def skin_tone(self) -> str | None:
        return skin_tone_of(self.skin_ita)

    def columns(self) -> dict:
        """The identities.parquet attribute columns."""
        return {
            "gender": self.gender,
            "gender_probability": self.gender_probability,
            "age": self.age,
            "skin_ita": self.skin_ita,
            "skin_tone": self.skin_tone,
            "attributes_from": self.attributes_from,
        }


NO_ATTRIBUTES = IdentityAttributes(None, None, None, None, None)


def _median(values: np.ndarray) -> float | None:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else None


def summarise(
    genders: list[str | None],
    probabilities: np.ndarray,
    ages: np.ndarray,
    itas: np.ndarray,
    source: str = FROM_IMAGES,
) -> IdentityAttributes:
    """One identity's attributes from its images' values (None / nan where an image has
    none); NO_ATTRIBUTES when no image has a face."""
    probabilities = np.asarray(probabilities, np.float64)
    votes = {gender: 0 for gender in GENDERS}
    mass = {gender: 0.0 for gender in GENDERS}
    for gender, probability in zip(genders, probabilities, strict=True):
        if gender in votes:
            votes[gender] += 1
            mass[gender] += float(probability)
            other = GENDERS[1 - GENDERS.index(gender)]
            mass[other] += 1.0 - float(probability)
    voted = sum(votes.values())
    if not voted:
        return NO_ATTRIBUTES
    gender = max(GENDERS, key=lambda name: (votes[name], mass[name]))
    return IdentityAttributes(
        gender=gender,
        gender_probability=mass[gender] / voted,
        age=_median(np.asarray(ages, np.float64)),
        skin_ita=_median(np.asarray(itas, np.float64)),
        attributes_from=source,
    )


def with_attributes(table: pa.Table, attributes: list[IdentityAttributes]) -> pa.Table:
    """`table` (identities, row order) with its attribute columns replaced."""
    for name in IDENTITY_ATTRIBUTE_COLUMNS:
        column = pa.array(
            [getattr(item, name) for item in attributes], IDENTITIES_SCHEMA.field(name).type
        )
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table
