#pragma once
// A TCP relay between two ferryd nodes that a test can cut and restore: the
// network failing under a migration. Cutting resets every relayed
// connection and refuses new ones until restored. Blocking sockets and a
// thread per direction: small, and independent of the code under test.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace ferry::test {

class TcpProxy {
public:
    explicit TcpProxy(unsigned short target) : target_(target) { open(); }
    ~TcpProxy() {
        cut();
        std::vector<std::thread> threads;
        {
            std::lock_guard lock(mutex_);
            threads.swap(threads_);
        }
        for (auto& t : threads)
            if (t.joinable())
                t.join();
    }
    unsigned short port() const { return port_; }

    void cut() {
        std::lock_guard lock(mutex_);
        if (listen_fd_ >= 0) {
            ::shutdown(listen_fd_, SHUT_RDWR);
            ::close(listen_fd_);
            listen_fd_ = -1;
        }
        for (auto& weak : conns_)
            if (auto c = weak.lock()) {
                ::shutdown(c->a, SHUT_RDWR);
                ::shutdown(c->b, SHUT_RDWR);
            }
        conns_.clear();
        ++cuts_;
    }
    void restore() { open(); }
    int cuts() const { return cuts_; }

private:
    struct Conn {
        int a = -1, b = -1;
        ~Conn() {
            ::close(a);
            ::close(b);
        }
    };

    void open() {
        int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        addr.sin_port = htons(port_);
        if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 16) != 0)
            throw std::runtime_error("proxy: cannot listen");
        socklen_t len = sizeof addr;
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
        port_ = ntohs(addr.sin_port);
        std::lock_guard lock(mutex_);
        listen_fd_ = fd;
        threads_.emplace_back([this, fd] { accept_loop(fd); });
    }

    void accept_loop(int fd) {
        for (;;) {
            int in = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
            if (in < 0)
                return; // cut
            int out = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            sockaddr_in addr{};
            addr.sin_family = AF_INET;
            addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            addr.sin_port = htons(target_);
            auto c = std::make_shared<Conn>();
            c->a = in;
            c->b = out;
            if (::connect(out, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
                continue; // c closes both
            std::lock_guard lock(mutex_);
            if (listen_fd_ != fd)
                return; // cut meanwhile
            conns_.push_back(c);
            threads_.emplace_back([c] { pump(c, c->a, c->b); });
            threads_.emplace_back([c] { pump(c, c->b, c->a); });
        }
    }

    // c keeps both sockets open while either direction runs.
    static void pump(std::shared_ptr<Conn> /*c*/, int from, int to) {
        std::vector<char> buf(1 << 16);
        for (;;) {
            auto n = ::read(from, buf.data(), buf.size());
            if (n <= 0)
                break;
            for (ssize_t off = 0; off < n;) {
                // MSG_NOSIGNAL: a peer that closed must not SIGPIPE the test.
                auto w = ::send(to, buf.data() + off, static_cast<std::size_t>(n - off), MSG_NOSIGNAL);
                if (w <= 0) {
                    ::shutdown(from, SHUT_RDWR);
                    return;
                }
                off += w;
            }
        }
        ::shutdown(to, SHUT_WR);
    }

    unsigned short target_;
    unsigned short port_ = 0;
    int listen_fd_ = -1;
    std::atomic<int> cuts_{0};
    std::mutex mutex_;
    std::vector<std::weak_ptr<Conn>> conns_;
    std::vector<std::thread> threads_;
};

} // namespace ferry::test
