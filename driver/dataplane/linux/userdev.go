package linux

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
)

// userDevice is wireguard-go serving one TUN link, configured by wgctrl
// through its UAPI socket like any WireGuard device.
type userDevice struct {
	tun  *nsTUN
	dev  *device.Device
	uapi net.Listener
	wg   sync.WaitGroup
	once sync.Once
}

// newUserDevice creates the TUN inside ns, so the link lives in the
// network's namespace, while wireguard-go's UDP sockets are opened later
// from this process's ordinary threads, in the host namespace: encrypted
// traffic leaves through the host's interfaces.
//
// The TUN uses IFF_VNET_HDR, so wireguard-go gets TSO/GRO batches from
// the kernel instead of one packet per read.
func newUserDevice(ns netns.NsHandle, name string, mtu int, log *slog.Logger) (*userDevice, error) {
	var t tun.Device
	if err := inNS(ns, func() (err error) {
		t, err = tun.CreateTUN(name, mtu)
		return err
	}); err != nil {
		return nil, fmt.Errorf("creating TUN %s: %w", name, err)
	}
	nt := &nsTUN{Device: t}
	nt.mtu.Store(int64(mtu))
	logger := &device.Logger{
		Verbosef: func(format string, args ...any) { log.Debug(fmt.Sprintf(format, args...)) },
		Errorf:   func(format string, args ...any) { log.Warn(fmt.Sprintf(format, args...)) },
	}
	u := &userDevice{tun: nt, dev: device.NewDevice(nt, conn.NewDefaultBind(), logger)}
	f, err := ipc.UAPIOpen(name)
	if err != nil {
		u.dev.Close()
		return nil, fmt.Errorf("opening UAPI socket for %s: %w", name, err)
	}
	u.uapi, err = ipc.UAPIListen(name, f)
	f.Close()
	if err != nil {
		u.dev.Close()
		return nil, fmt.Errorf("listening on UAPI socket for %s: %w", name, err)
	}
	u.wg.Add(1)
	go u.loopUAPI(log)
	return u, nil
}

func (u *userDevice) loopUAPI(log *slog.Logger) {
	defer u.wg.Done()
	for {
		c, err := u.uapi.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Debug("UAPI listener stopped", "err", err)
			}
			return
		}
		u.wg.Add(1)
		go func() {
			defer u.wg.Done()
			u.dev.IpcHandle(c)
		}()
	}
}

// setMTU records a new MTU before the link's is changed: the netlink
// event that follows makes wireguard-go read it back through nsTUN.
func (u *userDevice) setMTU(mtu int) { u.tun.mtu.Store(int64(mtu)) }

// nsTUN reports the MTU wgmesh set. wireguard-go asks the kernel by
// interface name from the calling thread's network namespace, where a TUN
// living in a network's namespace does not exist; it would then assume
// 1420 and pad packets past the real MTU, overflowing the underlay.
type nsTUN struct {
	tun.Device
	mtu atomic.Int64
}

func (t *nsTUN) MTU() (int, error) { return int(t.mtu.Load()), nil }

// close stops the device; the kernel removes the TUN link with it.
func (u *userDevice) close() {
	u.once.Do(func() {
		u.uapi.Close()
		u.dev.Close()
		u.wg.Wait()
	})
}
