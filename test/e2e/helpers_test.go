//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/wgmesh/wgmesh/test/lab"
	"github.com/wgmesh/wgmesh/test/poll"
)

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// network creates a wgmesh network on hosts (all if none given) and
// removes it, with its containers, when the test ends.
func network(t *testing.T, name, subnet string, extra []string, hosts ...*lab.Host) {
	t.Helper()
	if len(hosts) == 0 {
		hosts = theLab.Hosts
	}
	ctx := testCtx(t)
	if err := theLab.CreateNetwork(ctx, name, subnet, extra, hosts...); err != nil {
		t.Fatalf("creating network %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		for _, h := range hosts {
			out, _ := h.Docker(ctx, "ps", "-aq", "--filter", "network="+name)
			if ids := strings.Fields(out); len(ids) > 0 {
				_, _ = h.Docker(ctx, append([]string{"rm", "-f"}, ids...)...)
			}
		}
		if err := theLab.RemoveNetwork(ctx, name, hosts...); err != nil {
			t.Errorf("removing network %s: %v", name, err)
		}
	})
}

// container starts a container and removes it when the test ends.
func container(t *testing.T, h *lab.Host, name, net string, opts []string, cmd ...string) string {
	t.Helper()
	ip, err := h.RunContainer(testCtx(t), name, net, opts, cmd...)
	if err != nil {
		t.Fatalf("starting %s on %s: %v", name, h.Name, err)
	}
	t.Cleanup(func() { _, _ = h.Docker(context.Background(), "rm", "-f", name) })
	return ip
}

// ping asserts that a container reaches dst steadily, allowing a few
// seconds for a first handshake (TestFirstPing measures how long that
// takes): one answer first, then three in a row with none lost.
func ping(t *testing.T, h *lab.Host, ctr, dst string) {
	t.Helper()
	ctx := testCtx(t)
	// Whether an answer came or not, the steady pings below tell.
	_ = poll.Until(ctx, 10*time.Second, "a first answer", func() error {
		_, err := h.Docker(ctx, "exec", ctr, "ping", "-c", "1", "-W", "1", dst)
		return err
	})
	out, err := h.Docker(ctx, "exec", ctr, "ping", "-c", "3", "-W", "3", dst)
	if err != nil || !strings.Contains(out, " 0% packet loss") {
		t.Fatalf("%s on %s cannot ping %s: %v\n%s", ctr, h.Name, dst, err, out)
	}
}

// noPing asserts that a container does not reach dst.
func noPing(t *testing.T, h *lab.Host, ctr, dst string) {
	t.Helper()
	out, err := h.Docker(testCtx(t), "exec", ctr, "ping", "-c", "2", "-W", "1", dst)
	if err == nil {
		t.Fatalf("%s on %s reached %s, which it must not:\n%s", ctr, h.Name, dst, out)
	}
}

// transfer sends size KiB of random data from a container to another over
// TCP and checks that what arrives has the same checksum.
func transfer(t *testing.T, from *lab.Host, fromCtr string, to *lab.Host, toCtr, toIP string, kib int) {
	t.Helper()
	ctx := testCtx(t)
	// busybox nc quits when its stdin ends, and `docker exec -d` gives it
	// an empty one: keep it open so nc lives until the sender is done.
	if _, err := to.Docker(ctx, "exec", "-d", toCtr, "sh", "-c", "sleep 120 | nc -l -p 5001 > /tmp/recv"); err != nil {
		t.Fatal(err)
	}
	// Let the listener start.
	time.Sleep(300 * time.Millisecond)
	script := fmt.Sprintf("dd if=/dev/urandom of=/tmp/send bs=1024 count=%d 2>/dev/null && nc -w 10 %s 5001 < /tmp/send && md5sum /tmp/send", kib, toIP)
	out, err := from.Docker(ctx, "exec", fromCtr, "sh", "-c", script)
	if err != nil {
		t.Fatalf("sending from %s: %v\n%s", fromCtr, err, out)
	}
	sent := strings.Fields(out)[0]
	var got string
	poll.Eventually(t, 20*time.Second, "the data on "+toCtr, func() error {
		out, err := to.Docker(ctx, "exec", toCtr, "md5sum", "/tmp/recv")
		if err != nil {
			return err
		}
		if got = strings.Fields(out)[0]; got != sent {
			return fmt.Errorf("received checksum %s, sent %s", got, sent)
		}
		return nil
	})
}

// fileSize and fileFrom read a log from where it was at some point.
func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func fileFrom(t *testing.T, path string, offset int64) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if offset > int64(len(b)) {
		offset = 0
	}
	return string(b[offset:])
}
