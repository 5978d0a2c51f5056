// CallbackGuard: lets a callback that may run after its owner was destroyed
// find that out safely.
//
// An object that hands `this` to callbacks it cannot cancel (engine request
// completions, ImmCounter expectations) keeps a CallbackGuard, captures
// `guard.token()` in each callback and runs the callback's body through
// CallbackGuard::Run. The owner's destructor calls Close() first: it waits
// for a body that is running to finish, and every later Run does nothing.
//
//   engine->Submit(req, {.on_done = [t = guard_.token(), this] {
//     CallbackGuard::Run(t, [&] { OnDone(); });
//   }});
//   ~Owner() { guard_.Close(); ... }
//
// Bodies run under the token's mutex, one at a time: a body must not wait
// for another guarded callback of the same owner.
#pragma once

#include <memory>
#include <mutex>

namespace te {

class CallbackGuard {
 public:
  struct Token {
    std::mutex mu;
    bool open = true;
  };

  std::shared_ptr<Token> token() const { return token_; }

  // Runs `body` unless the owner has closed the guard.
  template <typename F>
  static void Run(const std::shared_ptr<Token>& token, F&& body) {
    std::lock_guard<std::mutex> lock(token->mu);
    if (token->open) body();
  }

  // Waits for a running body, then turns every later Run into a no-op.
  void Close() {
    std::lock_guard<std::mutex> lock(token_->mu);
    token_->open = false;
  }

 private:
  std::shared_ptr<Token> token_ = std::make_shared<Token>();
};

}  // namespace te
