"""The nested pydantic models the structured-output tests ask for: an Enum, a nested model and a pattern
make pydantic write ``$defs``/``$ref`` and ``pattern``, as real application models do. Strings are
bounded so a small model's greedy answer ends within max_tokens."""

from __future__ import annotations

import enum

from pydantic import BaseModel, Field


class Role(str, enum.Enum):
    ADMIN = "admin"
    USER = "user"


class Address(BaseModel):
    city: str = Field(max_length=16, description="the city")
    zip_code: str = Field(pattern=r"^\d{5}$", description="five digits")


class Person(BaseModel):
    """A person and where they live."""

    name: str = Field(max_length=16)
    role: Role
    address: Address


PERSON_PROMPT = "Alice is an admin who lives in Paris, postcode 75001. Describe her as JSON."


def check_person(person: Person) -> None:
    """What the grammar guarantees, whatever the small model chose to write."""
    assert isinstance(person, Person)
    assert isinstance(person.role, Role)
    assert len(person.address.zip_code) == 5
    assert person.address.zip_code.isdigit()
