// Internal to rings/: the free id lists of SplitQueue (descriptor ids) and
// PackedQueue (buffer ids), both a singly linked list through a member of
// the per-id shadow entry, ended by the queue size.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace uvirtio::rings::detail {

// One past the highest id with a chain in flight (0 when none): after a
// reset, handing ids out from there leaves the dropped ones for last.
template <class Extra>
std::uint16_t after_ids_in_flight(const std::vector<Extra>& extra, std::uint16_t size) {
  std::uint32_t after = 0;
  for (std::uint16_t i = 0; i < size; ++i)
    if (extra[i].chain_len != 0) after = i + 1u;
  return static_cast<std::uint16_t>(after % size);
}

// Links every id free, from `first` on (wrapping), except that the ids
// marked in `last` come after all the others; returns the list's head.
// first < size == last.size().
template <class Extra, class Link>
std::uint16_t link_free_ids_last(std::vector<Extra>& extra, std::uint16_t size, std::uint16_t first,
                                 Link Extra::*next, const std::vector<bool>& last) {
  std::uint16_t head = size, tail = size;
  for (const bool marked : {false, true}) {
    for (std::uint32_t k = 0; k < size; ++k) {
      const auto i = static_cast<std::uint16_t>((first + k) % size);
      if (last[i] != marked) continue;
      if (tail == size) {
        head = i;
      } else {
        extra[tail].*next = static_cast<Link>(i);
      }
      tail = i;
    }
  }
  extra[tail].*next = static_cast<Link>(size);
  return head;
}

// The checks of start_ids_at() and adopt_stale() on both rings; empty when fine.
inline std::string relink_problem(bool idle, bool in_order, std::uint16_t size, std::uint16_t first,
                                  std::span<const std::uint16_t> ids) {
  if (!idle || in_order || first >= size)
    return "needs an idle queue without in-order and a first id below " + std::to_string(size);
  for (const std::uint16_t id : ids)
    if (id >= size)
      return "id " + std::to_string(id) + " is not below the queue size " + std::to_string(size);
  return {};
}

}  // namespace uvirtio::rings::detail
