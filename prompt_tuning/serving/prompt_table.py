"""Prompt names -> bank rows, safe under hot reload.

A request resolves its prompt name to a bank row when it is admitted and holds a reference to that
row until it is answered. Replacing a prompt writes the new value into a *free* row and points the
name at it; removing a prompt unmaps the name. In both cases the old row is written again (freed)
only when the last request holding it has been answered, so an in-flight request is never served
with another prompt than the one it was admitted with, and never mis-routed.
"""

import dataclasses
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np


class UnknownPromptError(KeyError):
  """The request names a prompt the server does not have."""


class BankFullError(RuntimeError):
  """Every bank row is in use."""


@dataclasses.dataclass
class Slot:
  row: int
  name: Optional[str]  # None once the name moved to another row or was removed.
  version: str
  refs: int = 0
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class PromptTable:
  """Names -> rows of a bank of `capacity` rows, written through `write_row(row, value)`.

  Args:
    capacity: number of bank rows.
    write_row: writes a `[P, H]` value (or None: clear) into a row of the device bank.
  """

  def __init__(self, capacity: int, write_row: Callable[[int, Optional[np.ndarray]], None]):
    self._capacity = capacity
    self._write_row = write_row
    self._lock = threading.Lock()
    self._by_name: Dict[str, Slot] = {}
    self._slots: Dict[int, Slot] = {}

  @property
  def capacity(self) -> int:
    return self._capacity

  def names(self) -> List[str]:
    with self._lock:
      return sorted(self._by_name)

  def describe(self) -> List[Dict[str, Any]]:
    with self._lock:
      return [
          {'name': n, 'row': s.row, 'version': s.version, **dict(s.metadata)}
          for n, s in sorted(self._by_name.items())
      ]

  def rows_in_use(self) -> int:
    with self._lock:
      return len(self._slots)

  def _free_row(self) -> int:
    for row in range(self._capacity):
      if row not in self._slots:
        return row
    raise BankFullError(
        f'All {self._capacity} bank rows are in use (prompts plus rows still held by in-flight '
        'requests); raise the bank capacity (NUM_PROMPTS) or remove prompts.'
    )

  def put(
      self,
      name: str,
      value: np.ndarray,
      version: str,
      metadata: Optional[Mapping[str, Any]] = None,
  ) -> int:
    """Adds `name`, or replaces it when `version` differs. Returns the row that serves it now."""
    with self._lock:
      current = self._by_name.get(name)
      if current is not None and current.version == version:
        return current.row
      row = self._free_row()
      self._write_row(row, value)
      slot = Slot(row=row, name=name, version=version, metadata=dict(metadata or {}))
      self._slots[row] = slot
      self._by_name[name] = slot
      if current is not None:
        current.name = None
        self._maybe_free(current)
      return row

  def remove(self, name: str) -> bool:
    """Unmaps `name` (new requests get `UnknownPromptError`); its row is freed when unused."""
    with self._lock:
      slot = self._by_name.pop(name, None)
      if slot is None:
        return False
      slot.name = None
      self._maybe_free(slot)
      return True

  def acquire(self, name: str) -> int:
    """The row serving `name` now, held until `release(row)`."""
    with self._lock:
      slot = self._by_name.get(name)
      if slot is None:
        raise UnknownPromptError(name)
      slot.refs += 1
      return slot.row

  def release(self, row: int) -> None:
    with self._lock:
      slot = self._slots.get(row)
      if slot is None:
        return
      slot.refs -= 1
      self._maybe_free(slot)

  def _maybe_free(self, slot: Slot) -> None:
    if slot.name is None and slot.refs <= 0:
      self._slots.pop(slot.row, None)
      self._write_row(slot.row, None)
