// KV transfer with the other side in its own process, SIGKILLed mid-stream:
// the survivor turns the request into an error within its timeouts, frees
// it, and nothing hangs. Children are forked before this process starts any
// engine thread.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <sstream>
#include <thread>

#include "integration/kv_instances.h"

namespace te::testing {
namespace {

// A forked child and a line-based pipe to and from it.
class Child {
 public:
  template <typename F>
  explicit Child(F&& body) {
    int to[2], from[2];
    if (pipe(to) || pipe(from)) abort();
    pid_ = fork();
    if (pid_ == 0) {
      close(to[1]);
      close(from[0]);
      FILE* in = fdopen(to[0], "r");
      FILE* out = fdopen(from[1], "w");
      body(in, out);
      _exit(0);
    }
    close(to[0]);
    close(from[1]);
    to_ = fdopen(to[1], "w");
    from_ = fdopen(from[0], "r");
  }
  ~Child() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    fclose(to_);
    fclose(from_);
  }
  void Send(const std::string& line) {
    fprintf(to_, "%s\n", line.c_str());
    fflush(to_);
  }
  std::string Read() { return ReadLine(from_); }
  void Kill() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  static std::string ReadLine(FILE* f) {
    std::string s;
    for (int c; (c = fgetc(f)) != EOF && c != '\n';) s += char(c);
    return s;
  }
  static void Write(FILE* f, const std::string& line) {
    fprintf(f, "%s\n", line.c_str());
    fflush(f);
  }

 private:
  pid_t pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
};

TEST(KvMultiProcess, KilledPrefillerFailsTheRequestOnTheDecoder) {
  Child prefill([](FILE* in, FILE* out) {
    PrefillInstance p(TestLayout(1));
    Child::Write(out, p.Info().Serialize());
    Child::ReadLine(in);  // GO
    p.Start(1, {10, 11, 12});
    for (uint32_t l = 0; l < 6; ++l) {  // slow layers: the kill lands mid-stream
      std::this_thread::sleep_for(300ms);
      p.Layer(1, l);
    }
    p.Finish(1);
    Child::ReadLine(in);
  });
  auto info = kvcache::KvInstanceInfo::Parse(prefill.Read());
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  DecodeInstance decode(TestLayout(1));
  decode.Receive(1, *info, {1, 2, 3});
  prefill.Send("GO");
  std::this_thread::sleep_for(700ms);  // two layers in
  EXPECT_FALSE(decode.ready[0]->Has(1));
  prefill.Kill();
  const auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(decode.WaitAll(1));
  const auto waited = std::chrono::steady_clock::now() - t0;
  const Status s = decode.ready[0]->Get(1);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
  EXPECT_NE(s.message().find("silent"), std::string::npos) << s.ToString();
  EXPECT_LT(waited, 3s);  // peer_timeout is 600 ms
  EXPECT_EQ(decode.ranks[0]->active_requests(), 0u);
}

TEST(KvMultiProcess, KilledDecoderMakesThePrefillerDropTheRequest) {
  Child decode([](FILE* in, FILE* out) {
    DecodeInstance d(TestLayout(1));
    auto info = kvcache::KvInstanceInfo::Parse(Child::ReadLine(in));
    if (!info.ok()) return;
    d.Receive(2, *info, {4, 5});
    Child::Write(out, "ASKED");
    Child::ReadLine(in);  // killed while waiting here
  });
  kvcache::PrefillerOptions o = PrefillInstance::Defaults();
  PrefillInstance prefill(TestLayout(1), o);
  decode.Send(prefill.Info().Serialize());
  ASSERT_EQ(decode.Read(), "ASKED");
  prefill.Start(2, {30, 31});
  prefill.Layer(2, 0);
  prefill.Layer(2, 1);
  // Writes completed: the decoder's PULL had arrived before the kill.
  WaitUntil([&] { return prefill.ranks[0]->stats().writes > 0; }, 20s);
  ASSERT_GT(prefill.ranks[0]->stats().writes, 0u);
  decode.Kill();
  const auto t0 = std::chrono::steady_clock::now();
  for (uint32_t l = 2; l < 6; ++l) {
    std::this_thread::sleep_for(100ms);
    Status s = prefill.ranks[0]->LayerDone(2, l);
    if (!s.ok()) {
      EXPECT_EQ(s.code(), StatusCode::kNotFound) << s.ToString();  // dropped already
    }
  }
  Status f = prefill.ranks[0]->Finish(2, {});  // the prefill engine ends the request as usual
  if (!f.ok()) {
    EXPECT_EQ(f.code(), StatusCode::kNotFound) << f.ToString();
  }
  ASSERT_TRUE(prefill.sent.WaitCount(1, 15s)) << "the prefiller kept a request of a dead decoder";
  const auto waited = std::chrono::steady_clock::now() - t0;
  EXPECT_FALSE(prefill.sent.Get(2).ok());
  EXPECT_LT(waited, 8s);  // peer_timeout plus the engine's request timeout
  EXPECT_EQ(prefill.ranks[0]->active_requests(), 0u);
}

}  // namespace
}  // namespace te::testing
