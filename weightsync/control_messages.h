// The weight-sync control messages, sent with the engine's Send between a
// source (WeightPusher) and a receiver (WeightReceiver), one text line each:
//
//   tews1 BEGIN <version> <writes> <source rank>        source -> receiver
//   tews1 READY <version> <receiver rank>                receiver -> source
//   tews1 REFUSED <version> <receiver rank> <published>  receiver -> source
//
// Numbers are decimal, fields separated by one space, nothing after the
// last. They come from peers: the parsers refuse anything else (a missing
// or extra field, a sign, a number beyond 64 bits or beyond the ranges
// below) with kInvalidArgument naming what was wrong, and never throw.
// What a parsed message may still claim (a source rank the receiver does
// not have, more writes than its memory holds) is checked by the side that
// knows the bounds.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "base/status.h"

namespace te::weightsync {

// Ranks on the wire stay below this (a group of a million ranks).
inline constexpr uint32_t kMaxWireRank = 1u << 20;
// The longest control line either side sends or accepts.
inline constexpr size_t kMaxControlLine = 128;

struct BeginMessage {
  uint64_t version = 0;  // >= 1
  uint64_t writes = 0;   // immediates the source will send for it
  uint32_t source = 0;   // < kMaxWireRank
};

struct AnswerMessage {
  bool ready = false;      // READY; REFUSED otherwise
  uint64_t version = 0;    // >= 1
  uint32_t rank = 0;       // the receiver's, < kMaxWireRank
  uint64_t published = 0;  // REFUSED: the version the receiver holds
};

std::string EncodeBegin(const BeginMessage& m);
Result<BeginMessage> ParseBegin(std::span<const uint8_t> line);

std::string EncodeAnswer(const AnswerMessage& m);
Result<AnswerMessage> ParseAnswer(std::span<const uint8_t> line);

}  // namespace te::weightsync
