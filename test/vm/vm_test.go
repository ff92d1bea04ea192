package vm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func plan2() *Plan {
	return &Plan{Token: "t0k3n", Steps: []Step{{Name: "linux.test"}, {Name: "integration.test"}}}
}

// TestVerdict: the host trusts a run only when the markers of this run
// show every step from start to end and QEMU's exit status agrees.
func TestVerdict(t *testing.T) {
	good := []string{
		"[    0.000000] Linux version 6.1.0",
		"WGMESH-VM t0k3n READY 2.50",
		"WGMESH-VM t0k3n BEGIN 1 linux.test",
		"ok  	github.com/wgmesh/wgmesh/driver/dataplane/linux	40.1s",
		"WGMESH-VM t0k3n END 1 linux.test 0 41.0",
		"WGMESH-VM t0k3n BEGIN 2 integration.test",
		// The kernel may print into a line of ours.
		"[   99.1] random: crng init doneWGMESH-VM t0k3n END 2 integration.test 0 150.5",
		"WGMESH-VM t0k3n DONE 0",
	}
	without := func(drop string) []string {
		var out []string
		for _, l := range good {
			if !strings.Contains(l, drop) {
				out = append(out, l)
			}
		}
		return out
	}
	replace := func(old, new string) []string {
		var out []string
		for _, l := range good {
			out = append(out, strings.ReplaceAll(l, old, new))
		}
		return out
	}
	for _, tc := range []struct {
		name    string
		lines   []string
		exit    int
		wantErr string
		passed  bool
	}{
		{name: "all passed", lines: good, exit: 1, passed: true},
		{name: "a step failed", lines: append(replace("integration.test 0 150.5", "integration.test 1 150.5")[:7], "WGMESH-VM t0k3n DONE 1"), exit: 3},
		{name: "no boot", lines: good[:1], exit: 0, wantErr: "never became ready"},
		{name: "step never started", lines: without("BEGIN 2"), exit: 1, wantErr: "step 2 (integration.test) never started"},
		{name: "step never ended", lines: without("END 2"), exit: 1, wantErr: "started but never ended"},
		{name: "another run's token", lines: replace("t0k3n END 2", "other END 2"), exit: 1, wantErr: "never ended"},
		{name: "no DONE", lines: without("DONE"), exit: 1, wantErr: "did not finish"},
		{name: "powered off instead of debug exit", lines: good, exit: 0, wantErr: "not through the guest's isa-debug-exit"},
		{name: "exit status disagrees", lines: good, exit: 3, wantErr: "status 0 on the console but 1"},
		{name: "DONE disagrees with steps", lines: append(replace("integration.test 0 150.5", "integration.test 1 150.5")[:7], "WGMESH-VM t0k3n DONE 0"), exit: 1, wantErr: "steps say 1"},
		{name: "a test binary that ran no test", lines: append(good[:3:3], append([]string{"testing: warning: no tests to run", "PASS"}, good[4:]...)...), exit: 1, wantErr: "step 1 (linux.test) ran no test"},
		{name: "setup failed", lines: []string{"WGMESH-VM t0k3n SETUP-FAILED mounting 9p on /mnt/root: no such device", "WGMESH-VM t0k3n DONE 2"}, exit: 5, wantErr: "could not set up: mounting 9p"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newConsole("t0k3n")
			for i, l := range tc.lines {
				c.line(l, time.Duration(i)*time.Second)
			}
			r, err := c.verdict(plan2(), tc.exit)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if r.Passed() != tc.passed {
				t.Fatalf("passed = %v", r.Passed())
			}
			if r.Boot != time.Second || r.GuestUptime != 2500*time.Millisecond || len(r.Steps) != 2 || r.Steps[1].Took != 150500*time.Millisecond {
				t.Fatalf("result %+v", r)
			}
		})
	}
}

func TestCPIO(t *testing.T) {
	var buf bytes.Buffer
	c := newCPIOWriter(&buf)
	c.Dir("bin")
	c.File("bin/x", 0o755, []byte("hello"))
	c.File("odd", 0o644, []byte("abc"))
	c.Symlink("sbin/modprobe", "/bin/busybox")
	c.CharDev("dev/console", 0o600, 5, 1)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if buf.Len()%4 != 0 {
		t.Fatalf("archive of %d bytes is not padded", buf.Len())
	}
	got, err := readCPIO(buf.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"bin": "", "bin/x": "hello", "odd": "abc", "sbin/modprobe": "/bin/busybox", "dev/console": ""}
	gotS := map[string]string{}
	for k, v := range got {
		gotS[k] = string(v)
	}
	if d := cmp.Diff(want, gotS); d != "" {
		t.Fatal(d)
	}
}

// readCPIO reads a newc archive's names and contents.
func readCPIO(b []byte) (map[string][]byte, error) {
	out := map[string][]byte{}
	r := bytes.NewReader(b)
	for {
		hdr := make([]byte, 110)
		if _, err := io.ReadFull(r, hdr); err != nil {
			return nil, err
		}
		if string(hdr[:6]) != "070701" {
			return nil, fmt.Errorf("bad magic %q", hdr[:6])
		}
		var fields [13]int
		for i := range fields {
			if _, err := fmt.Sscanf(string(hdr[6+8*i:14+8*i]), "%08X", &fields[i]); err != nil {
				return nil, err
			}
		}
		size, nameSize := fields[6], fields[11]
		name := make([]byte, nameSize)
		if _, err := io.ReadFull(r, name); err != nil {
			return nil, err
		}
		_, _ = r.Seek(int64((4-(110+nameSize)%4)%4), io.SeekCurrent)
		data := make([]byte, size)
		if _, err := io.ReadFull(r, data); err != nil {
			return nil, err
		}
		_, _ = r.Seek(int64((4-size%4)%4), io.SeekCurrent)
		n := string(name[:nameSize-1])
		if n == "TRAILER!!!" {
			return out, nil
		}
		out[n] = data
	}
}

func TestParseShowDepends(t *testing.T) {
	dir := "/c/kernels/k/lib/modules/6.1.0-57-amd64"
	out := "insmod " + dir + "/kernel/net/ipv4/udp_tunnel.ko \n" +
		"insmod " + dir + "/kernel/drivers/net/wireguard/wireguard.ko \n" +
		"builtin unix\n" +
		"insmod " + dir + "/kernel/drivers/virtio/virtio.ko \n" +
		"insmod " + dir + "/kernel/net/ipv4/udp_tunnel.ko \n"
	got, err := parseShowDepends(out, dir)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"kernel/net/ipv4/udp_tunnel.ko", "kernel/drivers/net/wireguard/wireguard.ko", "kernel/drivers/virtio/virtio.ko"}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatal(d)
	}
	if _, err := parseShowDepends("insmod /elsewhere/x.ko\n", dir); err == nil {
		t.Fatal("a module outside the tree was accepted")
	}
}

func TestBzPayload(t *testing.T) {
	img := make([]byte, 8192)
	img[0x1f1] = 3 // setup sectors: protected-mode code at 4*512
	copy(img[0x202:], "HdrS")
	binary.LittleEndian.PutUint16(img[0x206:], 0x20f)
	binary.LittleEndian.PutUint32(img[0x248:], 100)
	binary.LittleEndian.PutUint32(img[0x24c:], 6)
	copy(img[4*512+100:], "\xfd7zXZ\x00")
	p, err := bzPayload(img)
	if err != nil {
		t.Fatal(err)
	}
	if string(p) != "\xfd7zXZ\x00" {
		t.Fatalf("payload % x", p)
	}
	binary.LittleEndian.PutUint32(img[0x24c:], 1<<20)
	if _, err := bzPayload(img); err == nil {
		t.Fatal("a payload past the end was accepted")
	}
	if _, err := bzPayload([]byte("MZ not a kernel")); err == nil {
		t.Fatal("not a bzImage, yet accepted")
	}
}
